import pytest
import torch

from lit_llama.decoder import one_slot
from lit_llama.loss import loss_sum
from lit_llama.model import LLaMA, LLaMAConfig


def small_config(**overrides) -> LLaMAConfig:
    return LLaMAConfig.from_name("tiny", **{"block_size": 64, "vocab_size": 100, "n_layer": 2, **overrides})


def test_config_defaults_and_named_configs():
    config = small_config()
    assert config.padded_vocab_size == 128  # rounded up to a multiple of 64
    assert config.head_size == 32
    assert LLaMAConfig.from_name("Llama-2-70b").n_query_groups == 8
    assert LLaMAConfig.from_name("7B").intermediate_size == 11008
    assert LLaMAConfig(n_embd=4096).intermediate_size == 11008  # LLaMA's 2/3 * 4 rule
    with pytest.raises(ValueError, match="unknown model config 'nope'; known: tiny, 7B"):
        LLaMAConfig.from_name("nope")


def test_config_json_round_trip(tmp_path):
    config = small_config(rope_base=5e5)
    config.save(tmp_path / "model_config.json")
    assert LLaMAConfig.from_json(tmp_path / "model_config.json") == config


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_forward_shapes_and_padding_rows_never_scored(n_query_groups):
    torch.manual_seed(0)
    model = LLaMA(small_config(n_query_groups=n_query_groups))
    assert model.lm_head.weight.shape == (128, 128)
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * n_query_groups) * 32, 128)
    idx = torch.randint(0, 100, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 100)  # vocab_size, not padded_vocab_size


def test_causal(n_query_groups=2):
    torch.manual_seed(0)
    model = LLaMA(small_config(n_query_groups=n_query_groups))
    idx = torch.randint(0, 100, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_kv_cache_decoding_equals_full_forward(n_query_groups):
    torch.manual_seed(0)
    model = LLaMA(small_config(n_query_groups=n_query_groups)).eval()
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        prefill = model(idx[:, :12], torch.arange(12).expand(2, 12))
        steps = [model(idx[:, t : t + 1], torch.tensor([[t], [t]])) for t in range(12, 20)]
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        last = model.head(model.hidden(idx[:, :12], torch.arange(12).expand(2, 12))[:, -1:])  # what a prefill asks for
        model.clear_kv_cache()
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, 11:12], atol=1e-5, rtol=1e-5)


def test_slots_of_the_kv_cache_are_sequences_of_their_own_lengths():
    torch.manual_seed(0)
    model = LLaMA(small_config(n_query_groups=2)).eval()
    a, b = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model.set_kv_cache(batch_size=2, max_seq_length=24)
        with one_slot(model, 0):  # stale: 20 positions slot 0 forgets
            model(torch.randint(0, 100, (1, 20)), torch.arange(20).unsqueeze(0))
        with one_slot(model, 0):  # each prompt read into its own slot
            prefill_a = model(a[:, :4], torch.arange(4).unsqueeze(0))
        with one_slot(model, 1):
            prefill_b = model(b[:, :11], torch.arange(11).unsqueeze(0))
        # both rows step together, each at its own position
        steps = [model(torch.cat([a[:, 4 + t : 5 + t], b[:, 11 + t : 12 + t]]), torch.tensor([[4 + t], [11 + t]]))
                 for t in range(5)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat([prefill_a, *(s[:1] for s in steps)], dim=1), full_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([prefill_b, *(s[1:] for s in steps)], dim=1), full_b, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_block_size_is_refused():
    model = LLaMA(small_config(block_size=16))
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's block_size=16"):
        model.set_kv_cache(1, 17)


def test_activation_checkpointing_recomputes_each_block_and_keeps_the_gradients():
    """With it on, the backward pass runs every block a second time, and every gradient is the same,
    dropout included (the recomputation replays the forward's random draws)."""
    from lit_llama.lora import LoRAConfig, inject_lora
    from lit_llama.vocab import attach_token_rows

    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LLaMA(small_config())
        attach_token_rows(model, [99])
        inject_lora(model, LoRAConfig(r=4, dropout=0.1, mlp=True))
        model.activation_checkpointing = checkpointing
        runs = []
        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda *_: runs.append(1))
        torch.manual_seed(3)
        loss_sum(model, idx, targets).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(runs))
    assert calls == [2, 4]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_residual_dropout_rises_with_depth_and_only_trains():
    torch.manual_seed(0)
    model = LLaMA(small_config(n_layer=4))
    idx = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        plain = model.eval()(idx)
        assert torch.equal(model.train()(idx), plain)  # off by default: training computes what eval does
        model.set_residual_dropout(0.3)
        assert [b.residual_dropout for b in model.transformer.h] == pytest.approx([0.0, 0.1, 0.2, 0.3])
        assert not torch.allclose(model.train()(idx), plain)
        assert torch.equal(model.eval()(idx), plain)
    with pytest.raises(ValueError, match=r"residual dropout must be in \[0, 1\), got 1.5"):
        model.set_residual_dropout(1.5)


def test_a_prompt_read_into_another_slot_with_gradients_and_checkpointing_lands_in_that_slot():
    """The checkpointed path once lost the slot: a prompt read into cache slot 1 went to slot 0."""
    torch.manual_seed(0)
    model = LLaMA(small_config())
    model.activation_checkpointing = True
    model.set_kv_cache(batch_size=2, max_seq_length=8)
    idx = torch.tensor([[1, 5, 9]])
    with one_slot(model, 1):
        model(idx, torch.arange(3).unsqueeze(0), kv_length=3)
    cache = model.transformer.h[0].attn.kv_cache
    assert cache.k[0].abs().sum() == 0 and cache.k[1, :, :3].abs().sum() > 0
