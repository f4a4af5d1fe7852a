from types import SimpleNamespace

import pytest
import torch

from lit_llama.generate import Generation, generate, stop_reason
from lit_llama.model import LLaMA, LLaMAConfig


class ScriptedModel(torch.nn.Module):
    """Stands in for LLaMA: whatever the input, the most likely next token at step i is script[i]."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = 1025) -> None:
        super().__init__()
        self.script, self.prompt_len = script, prompt_len
        self.config = SimpleNamespace(block_size=64, vocab_size=vocab_size)
        self.lm_head = torch.nn.Linear(1, 1)
        self.cached = None

    def set_kv_cache(self, batch_size, max_seq_length):
        self.cached = max_seq_length

    def clear_kv_cache(self):
        self.cached = None

    def forward(self, idx, input_pos):
        assert self.cached is not None and len(input_pos) == idx.shape[1]
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.config.vocab_size)
        step = int(input_pos[-1]) + 1 - self.prompt_len
        logits[:, -1, self.script[step]] = 10.0
        return logits


@pytest.mark.parametrize("k", [0, 1, 5])
def test_stops_on_eot_at_step_k(k, tokenizer):
    script = [10 + i for i in range(k)] + [tokenizer.eot_id] + [7] * 20
    model = ScriptedModel(script, prompt_len=3)
    result = generate(model, [1, 5, 6], max_new_tokens=20, stop_ids=tuple(tokenizer.stop_ids))
    assert result.tokens == script[:k] and result.stop_id == tokenizer.eot_id
    assert stop_reason(result, tokenizer) == "eot"
    assert model.cached is None  # the cache is released


def test_stops_on_eos_and_on_max_new_tokens(tokenizer):
    result = generate(ScriptedModel([9, tokenizer.eos_id], 2), [1, 5], 20, stop_ids=tuple(tokenizer.stop_ids))
    assert result.tokens == [9] and stop_reason(result, tokenizer) == "eos"
    result = generate(ScriptedModel([9] * 30, 2), [1, 5], 4, stop_ids=tuple(tokenizer.stop_ids))
    assert result.tokens == [9] * 4 and stop_reason(result, tokenizer) == "max_new_tokens"


def test_sampling_also_stops_on_eot(tokenizer):
    script = [11, 12, tokenizer.eot_id] + [7] * 10
    generator = torch.Generator().manual_seed(0)
    result = generate(ScriptedModel(script, 2), [1, 5], 10, temperature=0.5, top_k=3,
                      stop_ids=tuple(tokenizer.stop_ids), generator=generator)
    assert result == Generation([11, 12], tokenizer.eot_id)


def test_greedy_kv_cache_decoding_equals_uncached_decoding():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", block_size=64, vocab_size=100, n_layer=2)).eval()
    prompt = [1, 17, 42, 8]
    result = generate(model, prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.tokens == ids[len(prompt):]


def test_prompt_filling_the_context_is_refused():
    model = ScriptedModel([1], prompt_len=64)
    with pytest.raises(ValueError, match="no room left"):
        generate(model, list(range(64)), 5)
