"""The training loss: cross-entropy of the head's logits, summed, computed a chunk of positions at a time
so that the (N, vocab) logits and their gradient never exist whole.

    hidden = model.hidden(idx)                        # (B, T, C)
    sums = head_loss(model, hidden, targets, groups)  # (n_groups,): each group's summed cross-entropy

The special tokens' own rows (`model.token_rows`) score their ids in place of the head's rows.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_CHUNK_SIZE = 512  # positions whose logits `HeadLoss` holds at a time


class ScoreRows(torch.autograd.Function):
    """`F.linear(x, weight)` with the columns of `ids` scored by `rows` instead of `weight[ids]`.

    Autograd through an in-place write into the logits would copy the (B, T, V) gradient to zero those
    columns; here the backward reads only the k columns of `ids` beside the one full-size matmul."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, weight)
        logits[..., ids] = F.linear(x, rows.to(x.dtype))
        ctx.save_for_backward(x, weight, rows, ids)
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # under autocast the logits (and their gradient) are bf16 while a trained head is fp32: the backward,
        # which autocast does not cover, computes in the gradient's dtype and returns each input's own
        x, weight, rows, ids = ctx.saved_tensors
        dtype = grad.dtype
        grad_ids = grad[..., ids]  # (..., k)
        grad_x = grad_weight = grad_rows = None
        if ctx.needs_input_grad[0]:
            # grad @ weight counts weight[ids] where rows[ids] scored: swap their parts
            grad_x = (grad @ weight.to(dtype) + grad_ids @ (rows - weight[ids]).to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.flatten(0, -2).T @ x.flatten(0, -2).to(dtype)).to(weight.dtype)
            grad_weight[ids] = 0
        if ctx.needs_input_grad[2]:
            grad_rows = (grad_ids.flatten(0, -2).T @ x.flatten(0, -2).to(dtype)).to(rows.dtype)
        return grad_x, grad_weight, grad_rows, None


@dataclass
class Targets:
    """What each of N positions should predict, and the group its loss is summed in."""

    ids: torch.Tensor  # (N,), -100: not scored
    groups: torch.Tensor  # (N,) in [0, n_groups)
    n_groups: int = 1


def chunked_head_loss(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                      targets: Targets, *, with_grads: bool) -> tuple[torch.Tensor, ...]:
    """The cross-entropy of the head's logits against `targets`, summed per group of positions, a chunk of
    positions at a time, so the (N, V) logits never exist whole. With `with_grads`, also the gradients
    of each group's sum by x (per position: the positions are the groups'), by `rows` and by `weight`.

    x: (N, C); weight: (V, C); rows: (k, C) scoring `ids` (k,) in place of weight[ids]. Returns sums (G,)
    [, grad_x (N, C), grad_rows (G, k, C), grad_weight (G, V, C) or None when weight does not train]."""
    n_groups, chunk_size = targets.n_groups, LOSS_CHUNK_SIZE
    rows = rows.to(x.dtype)
    sums = torch.zeros(n_groups, device=x.device, dtype=torch.float32)
    if with_grads:
        grad_x = torch.empty_like(x)
        grad_rows = torch.zeros((n_groups, *rows.shape), device=x.device, dtype=torch.float32)
        grad_weight = torch.zeros((n_groups, *weight.shape), device=x.device, dtype=torch.float32) \
            if weight.requires_grad else None
    for start in range(0, x.shape[0], chunk_size):
        x_c, t_c, g_c = (t[start : start + chunk_size] for t in (x, targets.ids, targets.groups))
        logits = F.linear(x_c, weight).float()  # (chunk, V)
        logits[:, ids] = F.linear(x_c, rows).float()
        valid = t_c != -100
        safe = t_c.clamp(min=0).unsqueeze(1)
        log_probs = logits.log_softmax(-1)
        sums.index_add_(0, g_c, -log_probs.gather(1, safe).squeeze(1) * valid)
        if not with_grads:
            continue
        probs = log_probs.exp_()  # the gradient of the loss by the logits: softmax - one-hot
        probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
        probs.mul_(valid.unsqueeze(1))
        probs_ids = probs[:, ids]
        probs = probs.to(x.dtype)
        grad_x[start : start + chunk_size] = probs @ weight + probs_ids.to(x.dtype) @ (rows - weight[ids])
        for g in range(n_groups):  # each group's positions alone (one group: all of them)
            x_g = x_c if n_groups == 1 else x_c * (g_c == g).unsqueeze(1).to(x_c.dtype)
            grad_rows[g] += probs_ids.T @ x_g.float()
            if grad_weight is not None:
                grad_weight[g] += (probs.T @ x_g).float()
    if not with_grads:
        return (sums,)
    if grad_weight is not None:
        grad_weight[:, ids] = 0
    return sums, grad_x, grad_rows, grad_weight


class HeadLoss(torch.autograd.Function):
    """`chunked_head_loss` with its backward: the gradient is worked out during the forward pass, chunk
    by chunk (softmax minus one-hot, times the head), so neither the (N, V) logits nor their gradient
    ever exist whole: a (chunk, V) block and the (N, C) gradient of the hidden states are all the memory
    the head and the loss take."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                targets: Targets) -> torch.Tensor:
        sums, grad_x, grad_rows, grad_weight = chunked_head_loss(x, weight, rows, ids, targets, with_grads=True)
        ctx.rows_dtype, ctx.weight_dtype = rows.dtype, weight.dtype
        grad_weight = grad_weight if grad_weight is not None else torch.empty(0)
        ctx.save_for_backward(grad_x, grad_rows, grad_weight, targets.groups)
        return sums

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # grad: (G,), one per group's sum; each position's gradient scales by its group's
        grad_x, grad_rows, grad_weight, groups = ctx.saved_tensors
        grad_x = grad_x * grad[groups].unsqueeze(1).to(grad_x.dtype)
        grad_rows = (grad_rows * grad[:, None, None]).sum(0).to(ctx.rows_dtype) if ctx.needs_input_grad[2] else None
        grad_weight = (grad_weight * grad[:, None, None]).sum(0).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad_rows, None, None


def fused_head(head: nn.Module) -> bool:
    """Whether the head is its weight alone, which the fused loss reads directly; a LoRA head computes
    its own logits (model.head), a chunk at a time."""
    return type(head) is nn.Linear


def head_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, groups: Optional[torch.Tensor] = None,
              n_groups: int = 1) -> torch.Tensor:
    """The cross-entropy of the model's logits for final hidden states x (B, T, C) against targets (B, T),
    -100 not scored, summed per group (groups (B, T) in [0, n_groups); default: one group): (n_groups,)."""
    x, targets = x.flatten(0, 1), targets.flatten()  # (N, C), (N,)
    groups = torch.zeros_like(targets) if groups is None else groups.flatten()
    if not fused_head(model.lm_head):
        sums = torch.zeros(n_groups, device=x.device, dtype=torch.float32)
        for x_c, t_c, g_c in zip(*(t.split(LOSS_CHUNK_SIZE) for t in (x, targets, groups))):
            losses = F.cross_entropy(model.head(x_c).float(), t_c, reduction="none")
            sums = sums.index_add(0, g_c, losses)
        return sums
    weight = model.lm_head.weight[: model.config.vocab_size]
    if model.token_rows is None:
        rows, ids = weight[:0], torch.zeros(0, dtype=torch.long, device=x.device)
    else:
        rows, ids = model.token_rows.lm_head, model.token_rows.ids
    scored = Targets(targets, groups, n_groups)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or rows.requires_grad):
        return HeadLoss.apply(x, weight, rows, ids, scored)
    return chunked_head_loss(x, weight, rows, ids, scored, with_grads=False)[0]


def loss_sum(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy (): of the model's predictions for idx (B, T) against targets (B, T)."""
    return head_loss(model, model.hidden(idx), targets).sum()


def loss_sums(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy over the positions where `split` (B, T) is false, and where it is true: (2,)."""
    return head_loss(model, model.hidden(idx), targets, split.long(), n_groups=2)
