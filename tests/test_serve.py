"""generate/serve.py on 127.0.0.1, through the official openai client: replies equal offline decoding,
plain and streamed, one at a time and eight at once; bad requests get a 4xx and the server goes on;
SIGTERM lets an open reply finish."""

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import torch

openai = pytest.importorskip("openai", reason="pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import REPO  # noqa: E402
from lit_llama.checkpoint import load_model  # noqa: E402
from lit_llama.decoder import Decoder  # noqa: E402
from lit_llama.generate import generate, resolve_stop_ids  # noqa: E402
from lit_llama.prompts import encode_prompt  # noqa: E402
from lit_llama.engine import Engine  # noqa: E402
from lit_llama.serve import create_app  # noqa: E402
from lit_llama.streaming import ReplyText  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"
DRAINED = (0, -signal.SIGTERM)  # after draining, uvicorn exits by the signal it caught, as a shell expects


def start_server(checkpoint: Path, *flags: str, batch_size: int = 4) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, str(REPO / "generate/serve.py"), "--checkpoint_dir", str(checkpoint),
                               "--port", str(port), "--batch_size", str(batch_size), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {server.stdout.read()}")
        try:
            httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
            return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError("the server did not start in 120 s")


@pytest.fixture(scope="module")
def server(eot_checkpoint: Path) -> Iterator[str]:
    process, url = start_server(eot_checkpoint, "--api_key", KEY)
    yield url
    process.terminate()
    assert process.wait(timeout=60) in DRAINED


@pytest.fixture(scope="module")
def client(server: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


@functools.cache
def loaded(checkpoint: Path) -> tuple:
    return load_model(checkpoint).eval(), Tokenizer.from_dir(checkpoint)


def offline(checkpoint: Path, messages: list[str], max_tokens: int) -> str:
    """The greedy reply of `generate`, in process, without the server."""
    model, tokenizer = loaded(checkpoint)
    result = generate(model, encode_prompt(tokenizer, messages), max_tokens, stop_ids=resolve_stop_ids(tokenizer))
    return tokenizer.decode(result.tokens)


def ask(client: "openai.OpenAI", text: str, stream: bool = False, **kwargs) -> tuple[str, str]:
    """The reply's content and finish_reason, from a plain or a streamed request."""
    args = dict(model="eot", messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0) | kwargs
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.message.content, choice.finish_reason
    pieces, reason = [], None
    for chunk in client.chat.completions.create(stream=True, **args):
        pieces.append(chunk.choices[0].delta.content or "")
        reason = chunk.choices[0].finish_reason or reason
    return "".join(pieces), reason


def test_lists_the_model_and_requires_the_key(client, server):
    assert [m.id for m in client.models.list()] == ["eot"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()


def test_plain_and_streamed_replies_equal_offline_decoding(client, eot_checkpoint):
    expected = offline(eot_checkpoint, ["How do plants drink water?"], 24)
    assert ask(client, "How do plants drink water?") == (expected, "length")
    assert ask(client, "How do plants drink water?", stream=True) == (expected, "length")
    sampled = dict(temperature=1.0, top_p=0.9, seed=7)  # seeded: the same sample twice
    assert ask(client, "How do plants drink water?", **sampled) == ask(client, "How do plants drink water?", True, **sampled)


def test_a_stop_string_ends_the_reply_before_it(client, eot_checkpoint):
    expected = offline(eot_checkpoint, ["How do plants drink water?"], 24)
    stop = expected.split()[2]
    cut = expected[: expected.index(stop)]
    assert ask(client, "How do plants drink water?", stop=[stop, "never"]) == (cut, "stop")
    assert ask(client, "How do plants drink water?", stream=True, stop=stop) == (cut, "stop")


def test_eight_concurrent_requests_share_the_batch_and_equal_offline(client, eot_checkpoint):
    questions = [f"What is {thing}?" for thing in ("rain", "snow", "a river", "the sea", "a cat", "bread", "fire", "wind")]
    with ThreadPoolExecutor(8) as pool:  # 8 requests on 4 rows: the rest wait for a free row
        replies = list(pool.map(lambda q: ask(client, q, stream=q.endswith("r?")), questions))
    assert replies == [(offline(eot_checkpoint, [q], 24), "length") for q in questions]


def test_bad_requests_get_a_4xx_and_the_server_goes_on(client, server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server}/chat/completions", content=b'{"model": "eot", "messages": [', headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="alternate user, assistant"):
        client.chat.completions.create(model="eot", messages=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="the context holds 512 tokens") as error:
        client.chat.completions.create(model="eot", messages=[{"role": "user", "content": "rain " * 600}])
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens asks for 600"):
        client.chat.completions.create(model="eot", messages=[{"role": "user", "content": "Hi"}], max_tokens=600)
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist") as error:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="eot", messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    assert ask(client, "Still there?")[1] == "length"


def test_sigterm_lets_the_open_replies_finish(eot_checkpoint):
    process, url = start_server(eot_checkpoint, batch_size=1)  # one row: the replies queue, seconds of work
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    questions = ["Tell me a story.", "What is rain?", "Why is the sea salty?", "How do cats drink water?"]

    def read(stream) -> str:
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    streams = [client.chat.completions.create(model="eot", messages=[{"role": "user", "content": q}], max_tokens=400,
                                              temperature=0, stream=True) for q in questions]
    first = next(iter(streams[0]))  # the first reply is being decoded, the others wait for the row
    process.send_signal(signal.SIGTERM)
    with ThreadPoolExecutor(len(streams)) as pool:
        rest = list(pool.map(read, streams))
    assert process.wait(timeout=120) in DRAINED
    replies = [first.choices[0].delta.content + rest[0], *rest[1:]]
    assert replies == [offline(eot_checkpoint, [q], 400) for q in questions]
    assert "Waiting for connections to close" in process.stdout.read()


def test_eot_gives_finish_reason_stop(eot_checkpoint):
    model, tokenizer = load_model(eot_checkpoint).eval(), Tokenizer.from_dir(eot_checkpoint)
    prompt = encode_prompt(tokenizer, ["Hi"])
    final = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: final.append(out[0, -1]))
    with torch.no_grad():
        model(torch.tensor([prompt]))
        hook.remove()
        model.lm_head.weight[tokenizer.eot_id] = 100 * final[0]  # EOT scores highest after this prompt: it halts at once
    with Decoder(model, 2, 64) as decoder, TestClient(create_app(Engine(decoder), tokenizer, "halts")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        reply = client.chat.completions.create(model="halts", messages=[{"role": "user", "content": "Hi"}], max_tokens=9)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == ""
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 0)


def test_reply_text_holds_back_what_may_start_a_stop_string(tokenizer):
    ids = tokenizer.encode("The river runs to the sea, then rain.")
    for stop, kept in ((["sea,", "zzz"], "The river runs to the "), (["runs to", "rain."], "The river ")):
        text, streamed = ReplyText(tokenizer, stop), ""
        for i in ids:
            streamed += text.add(i)
            assert kept.startswith(streamed)  # nothing is sent that a stop string later cuts
        assert streamed + text.finish() == kept and text.stopped


def test_a_failed_step_answers_in_openai_format_and_the_server_goes_on(eot_checkpoint, monkeypatch):
    """A step that raises (a CUDA error, say) fails the requests in the batch with a 500 in OpenAI's error
    format (streamed: an error event), the decoder forgets what its rows held, and the next request is
    served as if nothing happened."""
    decoder = Decoder(load_model(eot_checkpoint).eval(), 2, 128)  # its own model: offline() uses the shared one
    tokenizer = Tokenizer.from_dir(eot_checkpoint)
    feed, failing = Decoder.feed, [True]

    def feed_or_fail(self, *args):
        if failing[0]:
            failing[0] = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return feed(self, *args)

    monkeypatch.setattr(Decoder, "feed", feed_or_fail)
    body = {"model": "eot", "messages": [{"role": "user", "content": "What is rain?"}], "max_tokens": 8,
            "temperature": 0}
    with TestClient(create_app(Engine(decoder), tokenizer, "eot")) as http:
        failed = http.post("/v1/chat/completions", json=body)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "illegal memory access" in error["message"]
        served = http.post("/v1/chat/completions", json=body)
        assert served.json()["choices"][0]["message"]["content"] == offline(eot_checkpoint, ["What is rain?"], 8)
        failing[0] = True
        events = http.post("/v1/chat/completions", json={**body, "stream": True}).text
        assert '"type": "server_error"' in events and "[DONE]" not in events
