"""The LLaMA model, whole, in one file.

Config, RMSNorm, rotary embeddings, attention (grouped-query, SDPA, KV cache), SwiGLU MLP and the
trainable rows of special tokens. Parameter names follow lit-llama (`transformer.wte`,
`transformer.h.{i}.attn.c_attn`, ...); `lit_llama/convert.py` maps the Hugging Face names
onto them. Queries and keys use the Hugging Face rotary layout (rotate-half), so HF weights load as
they are and logits match `LlamaForCausalLM`.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_llama.errors import BadValue
from lit_llama.files import write_atomic


LOSS_CHUNK_SIZE = 512  # positions whose logits `HeadLoss` holds at a time


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class LLaMAConfig:
    block_size: int = 2048  # longest sequence the rotary cache covers
    vocab_size: int = 32000  # ids the tokenizer can produce (special tokens included)
    padded_vocab_size: Optional[int] = None  # rows of wte/lm_head: vocab_size rounded up to 64
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: Optional[int] = None  # key/value heads: n_head is MHA, 1 is MQA, between is GQA
    intermediate_size: Optional[int] = None  # SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, 64)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            # LLaMA's rule: 2/3 of 4 * n_embd, rounded up to a multiple of 256
            self.intermediate_size = find_multiple(int(2 * 4 * self.n_embd / 3), 256)
        if self.n_embd % self.n_head:
            raise BadValue(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            raise BadValue(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            raise BadValue(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LLaMAConfig":
        if name not in configs:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(configs)}")
        return cls(**{**configs[name], **overrides})

    @classmethod
    def from_json(cls, path: Path) -> "LLaMAConfig":
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


configs = {
    # tiny shapes for tests and the embedded demo (vocab_size is set from the tokenizer)
    "tiny": dict(block_size=512, vocab_size=1024, n_layer=4, n_head=4, n_embd=128, n_query_groups=2,
                 intermediate_size=384, norm_eps=1e-5),
    # LLaMA 1 (rms eps as in the released params)
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, norm_eps=1e-6),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, norm_eps=1e-6),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, norm_eps=1e-5),
    # Llama 2
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "Llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8,
                        intermediate_size=28672),
    "CodeLlama-7b": dict(block_size=16384, vocab_size=32016, n_layer=32, n_head=32, n_embd=4096,
                         intermediate_size=11008, rope_base=1e6),
    # Mistral's 4096-token sliding window is the whole context at block_size 4096
    "Mistral-7B-v0.1": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8,
                            intermediate_size=14336),
    "TinyLlama-1.1B": dict(block_size=2048, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4,
                           intermediate_size=5632),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 as the reference does, then scale in the input dtype
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def build_rope_cache(seq_len: int, head_size: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos, sin: (T, hs), or (B, 1, T, hs) when each row has its own positions
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every position decoded so far, preallocated to a fixed length. Each row is a
    sequence of its own: rows of a batch may hold prompts of different lengths."""

    def __init__(self, batch_size: int, max_seq_length: int, n_query_groups: int, head_size: int,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               row: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, G, T, hs) written at positions input_pos (B, T): in rows 0..B-1, or in cache row `row` (B = 1)
        cache_k, cache_v = (self.k, self.v) if row is None else (self.k[row : row + 1], self.v[row : row + 1])
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
        # indexed by (B, T) slots, the cache's (B, G, S, hs) reads as (B, T, G, hs)
        cache_k[rows, :, input_pos] = k.transpose(1, 2).to(cache_k.dtype)
        cache_v[rows, :, input_pos] = v.transpose(1, 2).to(cache_v.dtype)
        return cache_k, cache_v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_query_groups = config.n_query_groups
        self.head_size = config.head_size
        # q, k and v in one matmul; the output is [q (n_head heads) | k (G heads) | v (G heads)]
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_size, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_size, self.n_query_groups * self.head_size
        q, k, v = self.c_attn(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)  # (B, G, T, hs)
        v = v.view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)  # (B, G, T, hs)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # q: (B, nh, T, hs); k, v: (B, G, S, hs) -> (B, nh, T, hs). Each k/v head serves its group of query heads
        if mask is None:  # causal, no mask: flash attention on a GPU, which takes grouped heads as they are
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_query_groups != self.n_head)
        # with a mask (the KV cache) a GPU runs the memory-efficient kernel, which does not take grouped heads in
        # every torch build (and math would hold fp32 (B, nh, T, S) scores): each group's query heads become
        # rows of one head, so SDPA sees as many query heads as k/v heads and no k/v is copied
        B, nh, T, hs = q.shape
        per_group = nh // self.n_query_groups
        q = q.reshape(B, self.n_query_groups, per_group * T, hs)  # (B, G, per_group * T, hs), head h = g * per_group + j
        mask = mask.repeat(1, 1, per_group, 1)  # (B, 1, per_group * T, S): row j * T + t is position t's
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, G, per_group * T, hs)
        return y.view(B, nh, T, hs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, row: Optional[int] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_qkv(x)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, row)  # (B, G, max_seq_length, hs)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]  # (B, G, S, hs): the positions the mask covers
        y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh * hs)
        return self.c_proj(y)


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(c_fc1(x)) * c_fc2(x))."""

    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.c_fc1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)  # HF gate_proj
        self.c_fc2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)  # HF up_proj
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)  # HF down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Block(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.rms_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.residual_dropout = 0.0  # on what attention and the MLP add to the residual stream, training only

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, row: Optional[int] = None) -> torch.Tensor:
        p = self.residual_dropout if self.training else 0.0
        x = x + F.dropout(self.attn(self.rms_1(x), cos, sin, mask, input_pos, row), p)
        return x + F.dropout(self.mlp(self.rms_2(x)), p)


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


def chunked_head_loss(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                      targets: torch.Tensor, groups: torch.Tensor, n_groups: int, chunk_size: int,
                      with_grads: bool) -> tuple[torch.Tensor, ...]:
    """The cross-entropy of the head's logits against `targets`, summed per group of positions, a chunk of
    positions at a time, so the (N, V) logits never exist whole. With `with_grads`, also the gradients
    of each group's sum by x (per position: the positions are the groups'), by `rows` and by `weight`.

    x: (N, C); weight: (V, C); rows: (k, C) scoring `ids` (k,) in place of weight[ids]; targets: (N,),
    -100 not scored; groups: (N,) in [0, n_groups). Returns sums (G,) [, grad_x (N, C), grad_rows
    (G, k, C), grad_weight (G, V, C) or None when weight does not train]."""
    rows = rows.to(x.dtype)
    sums = torch.zeros(n_groups, device=x.device, dtype=torch.float32)
    if with_grads:
        grad_x = torch.empty_like(x)
        grad_rows = torch.zeros((n_groups, *rows.shape), device=x.device, dtype=torch.float32)
        grad_weight = torch.zeros((n_groups, *weight.shape), device=x.device, dtype=torch.float32) \
            if weight.requires_grad else None
    for start in range(0, x.shape[0], chunk_size):
        x_c, t_c, g_c = (t[start : start + chunk_size] for t in (x, targets, groups))
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
                targets: torch.Tensor, groups: torch.Tensor, n_groups: int, chunk_size: int) -> torch.Tensor:
        sums, grad_x, grad_rows, grad_weight = chunked_head_loss(x, weight, rows, ids, targets, groups, n_groups,
                                                                 chunk_size, with_grads=True)
        ctx.rows_dtype, ctx.weight_dtype = rows.dtype, weight.dtype
        ctx.save_for_backward(grad_x, grad_rows, grad_weight if grad_weight is not None else torch.empty(0), groups)
        return sums

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # grad: (G,), one per group's sum; each position's gradient scales by its group's
        grad_x, grad_rows, grad_weight, groups = ctx.saved_tensors
        grad_x = grad_x * grad[groups].unsqueeze(1).to(grad_x.dtype)
        grad_rows = (grad_rows * grad[:, None, None]).sum(0).to(ctx.rows_dtype) if ctx.needs_input_grad[2] else None
        grad_weight = (grad_weight * grad[:, None, None]).sum(0).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad_rows, None, None, None, None, None


class TokenRows(nn.Module):
    """Trainable embedding and head rows for a few token ids (the special tokens), in place of theirs in
    `wte` and `lm_head`: parameters of their own, which can learn at their own rate.

    With the vocabulary frozen (LoRA, adapter), training k rows this way costs O(k * n_embd) in gradients,
    optimizer state and checkpoint size, where unfreezing `wte` and `lm_head` would cost O(vocab_size * n_embd).
    """

    def __init__(self, ids: torch.Tensor, wte_rows: torch.Tensor, head_rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ids", ids)  # (k,)
        self.wte = nn.Parameter(wte_rows)  # (k, n_embd)
        self.lm_head = nn.Parameter(head_rows)  # (k, n_embd)

    def embed(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # idx: (B, T); x: (B, T, C) looked up in the frozen table
        match = idx.unsqueeze(-1) == self.ids  # (B, T, k)
        rows = match.to(x.dtype) @ self.wte.to(x.dtype)  # (B, T, C), zero where no id matched
        return torch.where(match.any(-1, keepdim=True), rows, x)

    def head(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C); weight: (V, C), the frozen head -> logits (B, T, V), our ids scored by our rows
        return ScoreRows.apply(x, weight, self.lm_head, self.ids)

    def head_(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C); logits: (B, T, padded_vocab_size), overwritten in place at our ids
        logits[..., self.ids] = F.linear(x, self.lm_head.to(x.dtype)).to(logits.dtype)
        return logits


class LLaMA(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.token_rows: Optional[TokenRows] = None  # set by lit_llama.vocab for fine-tuning
        self.rope_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # built on first use, on the right device
        self.activation_checkpointing = False  # training: keep each block's input only, recompute the rest
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # only used when training from scratch (the tiny demo base); real weights are loaded over it
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_residual_dropout(self, top: float) -> None:
        """Residual dropout rising linearly with depth, from 0 at the first block to `top` at the last (LIMA's)."""
        if not 0 <= top < 1:
            raise BadValue(f"residual dropout must be in [0, 1), got {top}")
        n = len(self.transformer.h)
        for i, block in enumerate(self.transformer.h):
            block.residual_dropout = top * i / max(n - 1, 1)

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_cache is None or self.rope_cache[0].device != device:
            self.rope_cache = build_rope_cache(self.config.block_size, self.config.head_size, self.config.rope_base, device)
        return self.rope_cache

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None,
                     device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise BadValue(f"max_seq_length={max_seq_length} exceeds the model's block_size={self.config.block_size}")
        weight = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config.n_query_groups, self.config.head_size,
                                          device=device or weight.device, dtype=dtype or weight.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, last_only: bool = False, row: Optional[int] = None,
                loss_split: Optional[torch.Tensor] = None, kv_length: Optional[int] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Without a KV cache, positions are 0..T-1 and attention is causal.
        With one (`set_kv_cache`), `input_pos` (B, T) says where each token sits in its row's sequence,
        rows 0..B-1 of the cache; given `row`, the one row of idx (B = 1) goes to that cache row (a
        prompt read into a batch whose other rows are decoding). Attention reads the first `kv_length`
        cache positions (at least the furthest input_pos + 1; by default the whole cache, the one shape
        a compiled step keeps): the caller knows it without reading input_pos back from the device.
        Returns logits (B, T, vocab_size): the padding rows of the head are never scored; with
        `last_only`, (B, 1, vocab_size) for the last position, all a prompt's prefill needs. Given
        `targets` (B, T), the id each position should predict (-100: none), returns instead the summed
        cross-entropy, computed without the whole logits tensor (`chunked_head_loss`); with
        `loss_split` (B, T) bool, the two sums (2,) over the positions where it is false and where it is
        true (the task's and the mix's samples, the other tokens and the end-of-turn ones), in one pass."""
        B, T = idx.shape
        cos, sin = self.rope(idx.device)
        if input_pos is None:
            if T > self.config.block_size:
                raise BadValue(f"sequence of length {T} exceeds block_size={self.config.block_size}")
            cos, sin, mask = cos[:T], sin[:T], None
        else:
            cache = self.transformer.h[0].attn.kv_cache
            if cache is None:
                raise ValueError("input_pos places tokens in the KV cache: call set_kv_cache first")
            cos, sin = cos[input_pos].unsqueeze(1), sin[input_pos].unsqueeze(1)  # (B, 1, T, hs): each row its positions
            S = kv_length or cache.k.shape[2]
            # (B, 1, T, S): each new token sees its row's cached positions up to its own, never what a
            # longer sequence left in the row before
            mask = (torch.arange(S, device=idx.device) <= input_pos.unsqueeze(-1)).unsqueeze(1)

        x = self.transformer.wte(idx)  # (B, T, C)
        if self.token_rows is not None:
            x = self.token_rows.embed(idx, x)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # the backward pass runs the block again (same dropout draws) instead of storing its activations
                x = checkpoint(block, x, cos, sin, mask, input_pos, row, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos, row)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.head(x)
        if loss_split is None:
            return self.head_loss(x, targets).sum()  # the one group's sum, (): not a view, which FSDP2's hooks would lose
        return self.head_loss(x, targets, loss_split.long(), n_groups=2)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the final hidden states x (B, T, C), the special tokens' ids
        scored by `token_rows` when it is set."""
        vocab_size = self.config.vocab_size
        if type(self.lm_head) is not nn.Linear:  # LoRA on the head: score every row, then cut
            logits = self.lm_head(x)
            if self.token_rows is not None:
                logits = self.token_rows.head_(x, logits)
            return logits[..., :vocab_size]
        # a plain head scores only the real rows: contiguous logits, no cut to copy back in the backward
        weight = self.lm_head.weight[:vocab_size]
        if self.token_rows is None:
            return F.linear(x, weight)
        return self.token_rows.head(x, weight)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, groups: Optional[torch.Tensor] = None,
                  n_groups: int = 1) -> torch.Tensor:
        """The cross-entropy of the logits of x (B, T, C) against targets (B, T), -100 not scored, summed
        per group (groups (B, T) in [0, n_groups); default: one group): (n_groups,)."""
        x, targets = x.flatten(0, 1), targets.flatten()  # (N, C), (N,)
        groups = torch.zeros_like(targets) if groups is None else groups.flatten()
        if type(self.lm_head) is not nn.Linear:  # LoRA on the head: its logits, a chunk of positions at a time
            sums = torch.zeros(n_groups, device=x.device, dtype=torch.float32)
            for x_c, t_c, g_c in zip(*(t.split(LOSS_CHUNK_SIZE) for t in (x, targets, groups))):
                losses = F.cross_entropy(self.head(x_c).float(), t_c, reduction="none")
                sums = sums.index_add(0, g_c, losses)
            return sums
        weight = self.lm_head.weight[: self.config.vocab_size]
        if self.token_rows is None:
            rows, ids = weight[:0], torch.zeros(0, dtype=torch.long, device=x.device)
        else:
            rows, ids = self.token_rows.lm_head, self.token_rows.ids
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or rows.requires_grad):
            return HeadLoss.apply(x, weight, rows, ids, targets, groups, n_groups, LOSS_CHUNK_SIZE)
        return chunked_head_loss(x, weight, rows, ids, targets, groups, n_groups, LOSS_CHUNK_SIZE, with_grads=False)[0]
