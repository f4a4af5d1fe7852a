import random
from types import SimpleNamespace

import pytest
import torch

from lit_llama.decoder import Decoder, SlotRows
from lit_llama.generate import (ContinuousBatch, Generation, Request, Sampling, generate, generate_batch, resolve_stop_ids,
                                sample, stop_reason)
from lit_llama.model import KVCache, LLaMA, LLaMAConfig
from lit_llama.streaming import Detokenizer, Stream


class ScriptedModel(torch.nn.Module):
    """Stands in for LLaMA: whatever the input, the most likely next token of slot b at step i is scripts[b][i]."""

    def __init__(self, scripts: list[list[int]], prompt_len: int, vocab_size: int = 1025) -> None:
        super().__init__()
        self.scripts, self.prompt_len = scripts, prompt_len
        self.config = SimpleNamespace(block_size=64, vocab_size=vocab_size)
        self.lm_head = torch.nn.Linear(1, 1)
        self.attn = SimpleNamespace(kv_cache=None)
        self.transformer = SimpleNamespace(h=[SimpleNamespace(attn=self.attn)])
        self.cached = None

    def set_kv_cache(self, batch_size, max_seq_length):
        assert batch_size == len(self.scripts)
        slots = torch.arange(batch_size).view(-1, 1, 1, 1)  # a view of one slot's cache names the slot
        self.attn.kv_cache = KVCache(slots, slots.clone())
        self.cached = max_seq_length

    def clear_kv_cache(self):
        self.cached = self.attn.kv_cache = None

    def hidden(self, idx, input_pos, kv_length=None):
        assert self.cached is not None and input_pos.shape == idx.shape
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.config.vocab_size)
        cache = self.attn.kv_cache  # the whole cache, one slot's view of it, or the rows of prompts read together
        slots = cache.slots.tolist() if isinstance(cache, SlotRows) else cache.k.flatten().tolist()
        for b, slot in enumerate(slots):
            for t in range(idx.shape[1]):
                step = int(input_pos[b, t]) + 1 - self.prompt_len
                if 0 <= step < len(self.scripts[slot]):
                    logits[b, t, self.scripts[slot][step]] = 10.0
        return logits

    def head(self, x):
        return x  # the hidden states are the logits already

    def forward(self, idx, input_pos, kv_length=None):
        return self.head(self.hidden(idx, input_pos, kv_length))


def tiny_model(vocab_size: int = 100, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig.from_name("tiny", block_size=64, vocab_size=vocab_size, n_layer=2)).eval()


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_stops_on_eot_at_step_k(k, temperature, tokenizer):
    script = [10 + i for i in range(k)] + [tokenizer.eot_id] + [7] * 20
    model = ScriptedModel([script], prompt_len=3)
    result = generate(model, [1, 5, 6], max_new_tokens=20, temperature=temperature, top_k=3,
                      stop_ids=tuple(tokenizer.stop_ids), generator=torch.Generator().manual_seed(k))
    assert result == Generation(script[:k], tokenizer.eot_id)
    assert stop_reason(result, tokenizer) == "eot"
    assert model.cached is None  # the cache is released


def test_stops_on_eos_and_on_max_new_tokens(tokenizer):
    result = generate(ScriptedModel([[9, tokenizer.eos_id]], 2), [1, 5], 20, stop_ids=tuple(tokenizer.stop_ids))
    assert result.tokens == [9] and stop_reason(result, tokenizer) == "eos"
    result = generate(ScriptedModel([[9] * 30], 2), [1, 5], 4, stop_ids=tuple(tokenizer.stop_ids))
    assert result.tokens == [9] * 4 and stop_reason(result, tokenizer) == "max_new_tokens"


def test_each_row_of_a_batch_stops_on_its_own(tokenizer):
    eot, eos = tokenizer.eot_id, tokenizer.eos_id
    scripts = [[11, eot] + [7] * 10, [12, 13, 14, 15, eot] + [7] * 10, [16, eos] + [7] * 10, [17] * 12]
    model = ScriptedModel(scripts, prompt_len=2)
    results = generate_batch(model, [[1, 5]] * 4, 6, stop_ids=(eot, eos))
    assert results == [Generation([11], eot), Generation([12, 13, 14, 15], eot), Generation([16], eos),
                       Generation([17] * 6, None)]
    assert model.cached is None


def test_each_row_of_a_batch_keeps_its_own_max_new_tokens(tokenizer):
    eot = tokenizer.eot_id
    scripts = [[11] * 12, [12, eot] + [7] * 10, [13] * 12, [14] * 12]
    model = ScriptedModel(scripts, prompt_len=2)
    results = generate_batch(model, [[1, 5]] * 4, [3, 5, 1, 8], stop_ids=(eot,))
    assert results == [Generation([11] * 3, None), Generation([12], eot), Generation([13], None), Generation([14] * 8, None)]
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1 for each of the 2 prompts"):
        generate_batch(model, [[1, 5]] * 2, [3, 0])


def test_batch_of_mixed_lengths_equals_decoding_each_prompt_alone():
    model = tiny_model()
    prompts = [[1, 17, 42, 8], [1, 3], [1, 5, 6, 7], [1, 60, 61, 62, 63, 64, 65], [1, 9, 9, 9]]
    stop_ids = (13, 21)  # some rows meet one of them
    alone = [generate(model, p, 12, stop_ids=stop_ids) for p in prompts]
    assert generate_batch(model, prompts, 12, stop_ids=stop_ids, batch_size=2) == alone
    assert generate_batch(model, prompts, 12, stop_ids=stop_ids) == alone
    caps = [3, 12, 1, 7, 5]  # each row its own limit: the same tokens as alone with that limit
    assert generate_batch(model, prompts, caps, stop_ids=stop_ids) == \
        [generate(model, p, cap, stop_ids=stop_ids) for p, cap in zip(prompts, caps)]

    # sampled, each prompt with its own generator: the same tokens batched or alone
    sampling = dict(temperature=1.0, top_k=50, top_p=0.9)
    alone = [generate(model, p, 12, generator=torch.Generator().manual_seed(i), **sampling) for i, p in enumerate(prompts)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    assert generate_batch(model, prompts, 12, generators=generators, **sampling) == alone


def test_ragged_batch_equals_decoding_each_prompt_alone():
    model = tiny_model()  # block_size 64
    rng = random.Random(0)
    lengths = [1, 2, 3, 4, 5, 7, 9, 11, 13, 15, 17, 19, 22, 25, 28, 31, 35, 39, 43, 48, 53, 58, 62]  # 62: near the context
    prompts = [[1] + [rng.randrange(3, 100) for _ in range(n - 1)] for n in lengths]
    rng.shuffle(prompts)
    stop_ids = (13, 21)
    alone = [generate(model, p, 12, stop_ids=stop_ids) for p in prompts]
    assert len(alone[prompts.index(max(prompts, key=len))].tokens) <= 2  # the context cut the longest reply short
    assert generate_batch(model, prompts, 12, stop_ids=stop_ids, batch_size=8) == alone
    assert generate_batch(model, prompts, 12, stop_ids=stop_ids, batch_size=16) == alone

    sampling = dict(temperature=1.0, top_k=50, top_p=0.9)
    alone = [generate(model, p, 12, generator=torch.Generator().manual_seed(i), **sampling) for i, p in enumerate(prompts)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    assert generate_batch(model, prompts, 12, generators=generators, batch_size=8, **sampling) == alone


def test_a_finished_row_takes_the_next_waiting_prompt():
    model = tiny_model()
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1], [1, 11, 12], [1, 13, 14, 15, 16]]
    limits = [1, 9, 2, 1, 3, 1]  # no stop ids: each reply is exactly its limit long
    with torch.inference_mode(), Decoder(model, batch_size=2, max_seq_length=16) as decoder:
        batch = ContinuousBatch(decoder)
        requests = [Request(p, n) for p, n in zip(prompts, limits)]
        for request in requests:
            batch.submit(request)
        beside_the_long_one = []
        while batch.busy:
            batch.step()
            beside_the_long_one.append(batch.slots[0])
        # the 9-token reply kept row 1 while row 0 served the other five in turn: 9 samples, 8 steps
        assert decoder.steps == 8 and all(len(r.generation.tokens) == n for r, n in zip(requests, limits))
        assert {r for r in beside_the_long_one if r is not None} == {requests[i] for i in (2, 4)}
        assert model.transformer.h[0].attn.kv_cache.k.shape[:3] == (2, 2, 16)  # the cache never grew
        with pytest.raises(ValueError, match="a prompt of 14 tokens and 3 new tokens do not fit in the KV cache of 16"):
            batch.submit(Request([1] * 14, 3))
    assert [r.generation for r in requests] == [generate(model, p, n) for p, n in zip(prompts, limits)]


def test_a_cancelled_request_frees_its_row():
    model = tiny_model()
    with torch.inference_mode(), Decoder(model, batch_size=1, max_seq_length=32) as decoder:
        batch = ContinuousBatch(decoder)
        first, second = Request([1, 5], 20), Request([1, 6], 3)
        batch.submit(first)
        batch.submit(second)
        batch.step()
        batch.cancel(first)
        while batch.busy:
            batch.step()
    assert first.done and len(first.generation.tokens) == 1
    assert second.generation == generate(model, [1, 6], 3)


def test_greedy_kv_cache_decoding_equals_uncached_decoding():
    model = tiny_model()
    prompt = [1, 17, 42, 8]
    result = generate(model, prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.tokens == ids[len(prompt):]


def test_a_prompt_extending_the_cache_reads_only_the_new_tokens():
    model = tiny_model()
    history, more = [1, 17, 42, 8, 30], [31, 32, 33]
    with torch.no_grad(), Decoder(model, 1, 32) as decoder:
        decoder.prefill(0, history)
        assert decoder.prefilled == 5
        reused = decoder.prefill(0, history + more)
        assert decoder.prefilled == 3
        rewound = decoder.prefill(0, history[:2] + more)  # diverges at position 2: positions after it are rewritten
        assert decoder.prefilled == 3 and decoder.held == [history[:2] + more]
    with torch.no_grad():
        torch.testing.assert_close(reused, model(torch.tensor([history + more]))[0, -1])
        torch.testing.assert_close(rewound, model(torch.tensor([history[:2] + more]))[0, -1])


def test_waiting_prompts_are_read_in_one_forward_pass_with_the_head_at_their_last_tokens():
    """Four prompts of different lengths take the four slots in one forward pass, the head scoring one
    position of each; two more take slots that freed later. Every greedy reply (fp32) is its reply
    decoded alone."""
    model = tiny_model()
    prompts = [[1, 5, 9], [1, 7, 3, 2, 8, 9, 11], [1], [1, 4, 4, 4, 4], [1, 5, 9, 12, 13], [1, 7, 3, 2]]
    limits = [2, 9, 5, 7, 6, 4]
    passes, heads = [], []
    hidden = model.hidden
    model.hidden = lambda idx, *args, **kwargs: passes.append(tuple(idx.shape)) or hidden(idx, *args, **kwargs)
    model.lm_head.register_forward_hook(lambda module, args, out: heads.append(tuple(args[0].shape[:-1])))
    requests = [Request(prompt, limit) for prompt, limit in zip(prompts, limits)]
    with torch.inference_mode(), Decoder(model, 4, 32) as decoder:
        batch = ContinuousBatch(decoder)
        for request in requests:
            batch.submit(request)
        batch.step()
        assert passes == [(4, 7), (4, 1)] and heads == [(4,), (4, 1)]  # prompts, then everyone's next token
        while batch.busy:
            batch.step()
    del model.hidden
    for request, prompt, limit in zip(requests, prompts, limits):
        assert request.generation.tokens == generate(model, prompt, limit).tokens


def test_prompts_read_together_each_read_only_what_their_slot_lacks():
    model = tiny_model()
    history, more, other = [1, 17, 42, 8, 30], [31, 32, 33], [1, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    with torch.no_grad(), Decoder(model, 3, 32) as decoder:
        decoder.prefill(1, history)
        logits = decoder.prefill_many([2, 1, 0], [[1, 2], history + more, other], [0, 0, 0])  # (3, V)
        assert decoder.prefilled == 2 + 3 + 10 and decoder.held == [other, history + more, [1, 2]]
        tokens = logits.argmax(-1).flip(0)  # slot by slot: 0, 1, 2
        step = decoder.feed(tokens, tokens.tolist())  # the next step reads what they wrote
    with torch.no_grad():
        for row, ids in zip(logits, [[1, 2], history + more, other]):
            torch.testing.assert_close(row, model(torch.tensor([ids]))[0, -1])
        for row, ids in zip(step, decoder.held):  # each slot now holds its prompt and the token fed
            torch.testing.assert_close(row, model(torch.tensor([ids]))[0, -1])


def test_padded_vocabulary_rows_are_never_sampled():
    model = tiny_model(vocab_size=100)
    assert model.lm_head.weight.shape[0] == 128
    with torch.no_grad():
        model.lm_head.weight[100:] = 10.0  # padding rows that would win every step if they were scored
    for temperature in (0.0, 1.0):
        result = generate(model, [1, 2, 3], 20, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert max(result.tokens) < 100


def test_top_k_and_top_p_keep_only_the_most_likely_ids():
    logits = torch.tensor([4.0, 3.0, 2.9, 1.0, 0.5])  # probabilities .56 .21 .19 .03 .02
    generator = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample(logits, 1.0, generator=generator, **kw)) for _ in range(1000)}  # noqa: E731
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}  # id 0 alone holds more than half of the probability
    assert draws(top_p=0.9) == {0, 1, 2}
    assert len(draws()) == 5
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="--" + next(iter(bad))):
            Sampling(**bad)


def test_stop_ids_from_the_tokenizer_and_the_flags(tokenizer, base_tokenizer):
    eot, eos = tokenizer.eot_id, tokenizer.eos_id
    assert resolve_stop_ids(tokenizer) == (eot, eos)
    assert resolve_stop_ids(tokenizer, stop_on_eos=False) == (eot,)
    hello = tokenizer.processor.id_to_piece(565)
    # "7" is a piece (id 1007) and names it; "300" is no piece, so it is an id
    assert resolve_stop_ids(tokenizer, stop_tokens=("<|eot|>", hello, "7", "300")) == (eot, eos, 565, 1007, 300)
    assert resolve_stop_ids(base_tokenizer) == (eos,)  # no EOT: EOS is the fallback
    with pytest.raises(ValueError, match="--stop_tokens: 'nonsense' is not a piece"):
        resolve_stop_ids(tokenizer, stop_tokens=("nonsense",))


class CountingTokenizer:
    """Wraps a tokenizer, counting the ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


TEXTS = ["Héllo wörld — 你好 🌵 naïve café", "  two  spaces, a\ttab\nand a newline ", "🌵🌵🌵x"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any(tokenizer.processor.is_byte(i) for i in ids)  # byte-fallback pieces of one character
    counting = CountingTokenizer(tokenizer)
    detokenizer = Detokenizer(counting)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # a character is emitted whole, never as replacement chars
    assert counting.decoded < 12 * len(ids)  # a window per step, not the whole output again


def test_streamed_text_equals_the_decoded_text_for_any_ids(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        # any ids: bytes that form no character, lone "▁", control pieces (bos, EOT) amid text
        ids = [rng.choice([rng.randrange(tokenizer.vocab_size), rng.randrange(3, 259), 951, 1, tokenizer.eot_id])
               for _ in range(rng.randrange(1, 30))]
        detokenizer = Detokenizer(tokenizer)
        assert "".join([detokenizer.add(i) for i in ids] + [detokenizer.flush()]) == tokenizer.decode(ids), ids


def test_stream_yields_the_text_of_the_generation(tokenizer):
    tokens = tokenizer.encode("Plants drink 🌵 water through their roots.")
    model = ScriptedModel([tokens + [tokenizer.eot_id]], prompt_len=2)
    with torch.no_grad(), Decoder(model, 1, 64) as decoder:
        stream = Stream(tokenizer, decoder, Request([1, 5], 60, stop_ids=tokenizer.stop_ids))
        text = "".join(stream)
    assert stream.generation == Generation(tokens, tokenizer.eot_id)
    assert text == tokenizer.decode(tokens) == "Plants drink 🌵 water through their roots."


def test_compiled_decode_step_gives_the_same_tokens():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    model = tiny_model()
    prompt = [1, 17, 42, 8]
    assert generate_batch(model, [prompt], 16, compile=True) == [generate(model, prompt, 16)]


def test_prompt_filling_the_context_is_refused():
    model = ScriptedModel([[1]], prompt_len=64)
    with pytest.raises(ValueError, match="no room left"):
        generate(model, list(range(64)), 5)


def test_top_k_keeps_exactly_k_ids_when_the_kth_logit_ties():
    logits = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0])  # the 2nd, 3rd and 4th most likely tie
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=generator)) for _ in range(1000)}
    assert len(draws) == 2 and 0 in draws  # not every tie of the k-th value


def test_the_kv_cache_holds_what_the_prompt_and_reply_need_compiled_or_not(tokenizer, monkeypatch):
    """A compiled step used to get a cache of block_size positions per row: for a 16,384-token model,
    8 rows in bf16 are about 64 GiB. Compiled or not, it holds the longest prompt and its reply."""
    import lit_llama.generate as generate_module

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    model.config.block_size = 64
    sizes = []
    set_kv_cache = model.set_kv_cache
    monkeypatch.setattr(model, "set_kv_cache", lambda batch_size, max_seq_length: (
        sizes.append((batch_size, max_seq_length)), set_kv_cache(batch_size, max_seq_length))[1])
    monkeypatch.setattr(generate_module, "compile_step", lambda model: model)  # the sizes, not the compiler
    generate_batch(model, [[1, 2, 3], [1, 2, 3, 4, 5]], 6, compile=True)
    assert sizes == [(2, 11)]
