"""`/v1/completions` (legacy completions, with echo and log-probabilities), log-probabilities and `n` on
`/v1/chat/completions`, and `/tokenize` and `/detokenize`, through the official openai client on the
app in process: every log-probability equals the model's own log-softmax over the whole sequence."""

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

openai = pytest.importorskip("openai", reason="pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from lit_llama.checkpoint import load_model  # noqa: E402
from lit_llama.engine import Engine  # noqa: E402
from lit_llama.decoder import Decoder  # noqa: E402
from lit_llama.generate import generate, resolve_stop_ids  # noqa: E402
from lit_llama.prompts import encode_prompt  # noqa: E402
from lit_llama.serve import create_app  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def served(eot_checkpoint: Path) -> Iterator[tuple]:
    model, tokenizer = load_model(eot_checkpoint).eval(), Tokenizer.from_dir(eot_checkpoint)
    with Decoder(model, 3, 256) as decoder, TestClient(create_app(Engine(decoder), tokenizer, "eot")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        yield client, http, load_model(eot_checkpoint).eval(), tokenizer  # a model of its own for the references


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(T, V): position i's log-probabilities of the token after it, in one pass without a KV cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def continuation(model, tokenizer: Tokenizer, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    """The greedy continuation of `prompt` in process, and its text as it follows the prompt's."""
    tokens = generate(model, prompt, max_tokens, stop_ids=resolve_stop_ids(tokenizer)).tokens
    return tokens, tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]


def test_echo_scores_every_token_as_the_model_does(served):
    client, _, model, tokenizer = served
    prompt = tokenizer.encode("The river runs to the sea", bos=True)
    tokens, text = continuation(model, tokenizer, prompt, 6)
    answer = client.completions.create(model="eot", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=3)
    choice = answer.choices[0]
    ids = prompt + tokens
    assert choice.text == tokenizer.decode(prompt) + text and choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 6)
    logprobs, reference = choice.logprobs, log_softmax(model, ids)
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-5)
        values, best = reference[i - 1].topk(3)
        assert list(logprobs.top_logprobs[i].values()) == pytest.approx(values.tolist(), abs=1e-5)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert logprobs.tokens[2] == " " + tokenizer.processor.id_to_piece(ids[2])[1:]  # a word's mark is its space
    # streamed: the same text and scores, in pieces
    pieces = list(client.completions.create(model="eot", prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                            logprobs=3, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == choice.text
    streamed = [lp for p in pieces if p.choices[0].logprobs for lp in p.choices[0].logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs
    assert [p.choices[0].finish_reason for p in pieces][-1] == "length"


def test_a_batch_of_prompts_with_n_samples_each(served):
    client, _, model, tokenizer = served
    texts = ["What is rain?", "Tell me about cats"]
    answer = client.completions.create(model="eot", prompt=texts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for i, text in enumerate(texts):
        expected = continuation(model, tokenizer, tokenizer.encode(text, bos=True), 5)[1]
        assert [c.text for c in answer.choices[2 * i : 2 * i + 2]] == [expected, expected]  # greedy: both alike
    seeded = dict(model="eot", prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0, seed=3)
    first, again = (client.completions.create(**seeded).choices for _ in range(2))
    assert [c.text for c in first] == [c.text for c in again] and first[0].text != first[1].text


def test_the_prompt_alone_is_scored_with_max_tokens_0(served):
    client, http, model, tokenizer = served
    prompt = tokenizer.encode("Plants drink water", bos=True)
    answer = client.completions.create(model="eot", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    reference = log_softmax(model, prompt)
    assert answer.choices[0].text == tokenizer.decode(prompt) and answer.usage.completion_tokens == 0
    assert answer.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [reference[i - 1, prompt[i]].item() for i in range(1, len(prompt))], abs=1e-5)
    assert answer.choices[0].logprobs.top_logprobs[1] == {}
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 gives nothing without echo"):
        client.completions.create(model="eot", prompt=prompt, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="prompt 0 holds a token id outside"):
        client.completions.create(model="eot", prompt=[1, 10**6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="the context holds 256 tokens") as error:
        client.completions.create(model="eot", prompt="rain " * 300, max_tokens=2)
    assert error.value.code == "context_length_exceeded"
    bad = http.post("/v1/completions", json={"model": "eot", "prompt": "Hi", "logprobs": 21})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"


def test_chat_gives_n_replies_and_their_log_probabilities(served):
    client, _, model, tokenizer = served
    messages = [{"role": "user", "content": "How do plants drink water?"}]
    answer = client.chat.completions.create(model="eot", messages=messages, max_tokens=6, temperature=0, n=2,
                                            logprobs=True, top_logprobs=2)
    prompt = encode_prompt(tokenizer, [messages[0]["content"]])
    tokens, _ = continuation(model, tokenizer, prompt, 6)
    reference = log_softmax(model, prompt + tokens)
    for choice in answer.choices:
        assert choice.message.content == tokenizer.decode(tokens)
        content = choice.logprobs.content
        assert [c.logprob for c in content] == pytest.approx(
            [reference[len(prompt) + i - 1, t].item() for i, t in enumerate(tokens)], abs=1e-5)
        assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    assert answer.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="eot", messages=messages, max_tokens=6, temperature=0, n=2,
                                                 stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
        assert text == tokenizer.decode(tokens)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="eot", messages=messages, top_logprobs=2)


def test_tokenize_and_detokenize(served):
    _, http, _, tokenizer = served
    text = "How do plants drink water?"
    tokens = http.post("/tokenize", json={"model": "eot", "prompt": text}).json()
    assert tokens == {"count": len(tokens["tokens"]), "max_model_len": 256, "tokens": tokenizer.encode(text, bos=True)}
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert plain == tokenizer.encode(text)
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["tokens"]
    assert chat == encode_prompt(tokenizer, [text])
    assert http.post("/detokenize", json={"tokens": plain}).json() == {"prompt": text}
    assert http.post("/tokenize", json={"model": "gpt-4", "prompt": text}).status_code == 404
    error = http.post("/detokenize", json={"tokens": [-1]})
    assert error.status_code == 400 and json.loads(error.text)["error"]["param"] == "tokens"


def test_a_reply_that_ends_on_the_end_of_turn_token_scores_it(eot_checkpoint):
    """lm-eval reads the token `max_tokens: 1` decodes as the last of `token_logprobs`: when it is the stop
    id, it is there too (no text of its own), and chat's logprobs leave it out."""
    model, tokenizer = load_model(eot_checkpoint).eval(), Tokenizer.from_dir(eot_checkpoint)
    prompt = tokenizer.encode("Plants drink water", bos=True)
    final = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: final.append(out[0, -1]))
    with torch.no_grad():
        model(torch.tensor([prompt]))
        hook.remove()
        model.lm_head.weight[tokenizer.eot_id] = 100 * final[0]  # EOT scores highest after this prompt
    with Decoder(model, 1, 64) as decoder, TestClient(create_app(Engine(decoder), tokenizer, "halts")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        choice = client.completions.create(model="halts", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                           logprobs=1).choices[0]
    assert choice.finish_reason == "stop" and choice.text == tokenizer.decode(prompt)
    assert len(choice.logprobs.token_logprobs) == len(prompt) + 1
    assert choice.logprobs.text_offset[-1] == len(choice.text)
    assert choice.logprobs.tokens[-1] == tokenizer.processor.id_to_piece(tokenizer.eot_id)
