"""The fast paths of the model and LoRA give the outputs and gradients of the plain formulas."""

import pytest
import torch
import torch.nn.functional as F

from lit_llama.lora import LoRAConfig, LoRALinear, inject_lora
from lit_llama.loss import ScoreRows, loss_sum, loss_sums
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.vocab import attach_token_rows, merge_token_rows


def grads(outputs: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    upstream = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(outputs, inputs, upstream))


@pytest.mark.parametrize("ids", [[7], [3, 40], [49]])
def test_score_rows_matches_writing_the_rows_into_the_logits(ids):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    rows = torch.randn(len(ids), 16, requires_grad=True)
    index = torch.tensor(ids)
    fast = ScoreRows.apply(x, weight, rows, index)
    reference = F.linear(x, weight).index_copy(-1, index, F.linear(x, rows))
    torch.testing.assert_close(fast, reference)
    for got, expected in zip(grads(fast, [x, weight, rows]), grads(reference, [x, weight, rows])):
        torch.testing.assert_close(got, expected)


def small_model() -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", block_size=32, vocab_size=100, n_layer=2))


@pytest.mark.parametrize("lora_head", [False, True])  # a plain head, and LoRA on the head (the in-place path)
def test_head_scores_special_ids_by_their_rows_and_never_the_padding(lora_head):
    model = small_model()
    inject_lora(model, LoRAConfig(r=4, dropout=0.0, head=lora_head))
    attach_token_rows(model, [5, 99])
    torch.nn.init.normal_(model.token_rows.lm_head)
    x = torch.randn(2, 6, 128, requires_grad=True)
    rows = model.token_rows.lm_head
    logits = model.head(x)
    expected = F.linear(x, model.lm_head.weight[:100]).index_copy(-1, torch.tensor([5, 99]), F.linear(x, rows))
    assert logits.shape == (2, 6, 100)
    torch.testing.assert_close(logits, expected)
    for got, want in zip(grads(logits, [x, rows]), grads(expected, [x, rows])):
        torch.testing.assert_close(got, want)


def test_token_rows_model_equals_the_merged_model():
    model = small_model()
    attach_token_rows(model, [5, 99])
    torch.nn.init.normal_(model.token_rows.wte)
    torch.nn.init.normal_(model.token_rows.lm_head)
    idx = torch.tensor([[1, 5, 7, 99, 5, 3]])
    logits = model(idx)
    merge_token_rows(model)
    torch.testing.assert_close(logits, model(idx))


def reference_lora(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + x A_i^T B_i^T * scaling on each enabled chunk, written out chunk by chunk."""
    parts, b_start = [], 0
    out = x @ layer.weight.T
    for i, (start, size) in enumerate(layer.lora_slices):
        a_i = layer.lora_A[i * layer.r : (i + 1) * layer.r]
        b_i = layer.lora_B[b_start : b_start + size]
        update = torch.zeros_like(out)
        update[..., start : start + size] = x @ a_i.T @ b_i.T * layer.scaling
        parts.append(update)
        b_start += size
    return out + sum(parts)


@pytest.mark.parametrize("enabled", [[True, False, True], [False, True, False], [True, True, True], None])
def test_lora_forward_and_gradients_match_the_chunkwise_formula(enabled):
    torch.manual_seed(0)
    chunks = None if enabled is None else [8, 4, 4]
    layer = LoRALinear(12, 16, r=2, alpha=4, dropout=0.0, chunks=chunks, enabled=enabled)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B]
    fast, reference = layer(x), reference_lora(layer, x)
    torch.testing.assert_close(fast, reference)
    for got, expected in zip(grads(fast, params), grads(reference, params)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_loss_is_the_summed_cross_entropy_of_the_logits(method, monkeypatch):
    monkeypatch.setattr("lit_llama.loss.LOSS_CHUNK_SIZE", 5)  # several chunks, the last one short
    model = small_model()
    if method == "lora":
        inject_lora(model, LoRAConfig(r=4, dropout=0.0))
        attach_token_rows(model, [5, 99])
        torch.nn.init.normal_(model.token_rows.lm_head)
        torch.nn.init.normal_(model.transformer.h[0].attn.c_attn.lora_B)
    params = [p for n, p in model.named_parameters() if method == "full" or "lora_" in n or "token_rows" in n]
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    targets[0, :3] = -100
    targets[:, 5] = 99  # the special id, scored by its own row
    loss = loss_sum(model, idx, targets)
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss * 0.5, params)
    want = torch.autograd.grad(expected * 0.5, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(loss_sum(model, idx, targets), expected)


@pytest.mark.parametrize("grad", [True, False])
def test_loss_sums_sum_each_side_of_the_split_for_the_cost_of_one_loss(grad, monkeypatch):
    monkeypatch.setattr("lit_llama.loss.LOSS_CHUNK_SIZE", 5)
    model = small_model()
    attach_token_rows(model, [99])
    idx = torch.randint(0, 100, (3, 8))
    targets = torch.randint(0, 100, (3, 8))
    targets[:, 6] = 99
    targets[2, :4] = -100
    split = torch.zeros(3, 8, dtype=torch.bool)
    split[1] = True  # one row apart (a mixed-in sample), and every position of one id (the end-of-turn)
    split |= targets == 99
    per_position = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), reduction="none").view(3, 8)
    with torch.set_grad_enabled(grad):
        losses = loss_sums(model, idx, targets, split)
        assert losses.shape == (2,)
        torch.testing.assert_close(losses, torch.stack([per_position[~split].sum(), per_position[split].sum()]))
        if grad:  # one backward through both sums is the plain loss's
            params = [p for p in model.parameters() if p.requires_grad]
            got = torch.autograd.grad(losses.sum(), params)
            want = torch.autograd.grad(loss_sum(model, idx, targets), params)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    nothing = loss_sums(model, idx, targets, torch.zeros_like(split))  # an empty side sums to 0
    assert nothing[1].item() == 0


def test_score_rows_backward_under_bf16_autocast_with_an_fp32_head():
    """Full fine-tuning: the head trains in fp32 while autocast computes the logits in bf16. The backward
    runs outside autocast, so it must meet the bf16 gradient with the fp32 weight itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    rows = torch.randn(2, 16, requires_grad=True)
    index = torch.tensor([3, 40])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = ScoreRows.apply(x, weight, rows, index)
        reference = F.linear(x, weight).index_copy(-1, index, F.linear(x, rows))
    assert fast.dtype == torch.bfloat16
    got, want = grads(fast, [x, weight, rows]), grads(reference, [x, weight, rows])
    for g, w, param in zip(got, want, [x, weight, rows]):
        assert g.dtype == param.dtype
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.02)


def test_the_loss_without_gradients_never_holds_the_whole_logits(monkeypatch):
    """Validation scores in chunks too: a (chunk, V) block at a time, not the (B*T, V) logits (4 x 2048
    x 32000 fp32 are 1 GB)."""
    monkeypatch.setattr("lit_llama.loss.LOSS_CHUNK_SIZE", 5)
    model = small_model()
    attach_token_rows(model, [99])
    idx, targets = torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8))
    rows, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *args: (rows.append(x.shape[:-1].numel() if w.shape[0] == 100 else 0),
                                                          linear(x, w, *args))[1])
    with torch.no_grad():
        losses = loss_sums(model, idx, targets, targets == 99)
    assert max(rows) == 5
    monkeypatch.undo()
    per_position = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), reduction="none")
    split = (targets == 99).flatten()
    torch.testing.assert_close(losses, torch.stack([per_position[~split].sum(), per_position[split].sum()]))
