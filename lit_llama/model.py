"""The LLaMA model, whole, in one file.

Config, RMSNorm, rotary embeddings, attention (grouped-query, SDPA, KV cache) and the SwiGLU MLP.
The loss lives in `lit_llama/loss.py`, the special tokens' trainable rows in `lit_llama/vocab.py`. Parameter names follow lit-llama (`transformer.wte`,
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

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        # k, v: (B, G, max_seq_length, hs); views of another cache's rows write into that cache
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, G, T, hs) written at positions input_pos (B, T) of rows 0..B-1
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
        # indexed by (B, T) slots, the cache's (B, G, S, hs) reads as (B, T, G, hs)
        self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


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
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_qkv(x)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, G, max_seq_length, hs)
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
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        p = self.residual_dropout if self.training else 0.0
        x = x + F.dropout(self.attn(self.rms_1(x), cos, sin, mask, input_pos), p)
        return x + F.dropout(self.mlp(self.rms_2(x)), p)


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
        self.token_rows: Optional[nn.Module] = None  # the special tokens' own rows when fine-tuning (vocab.TokenRows)
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
        shape = (batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size)
        for block in self.transformer.h:
            k, v = (torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype) for _ in range(2))
            block.attn.kv_cache = KVCache(k, v)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                kv_length: Optional[int] = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the token ids idx (B, T); see `hidden` for the arguments."""
        return self.head(self.hidden(idx, input_pos, kv_length))

    def hidden(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
               kv_length: Optional[int] = None) -> torch.Tensor:
        """The final hidden states (B, T, C) of idx (B, T), normed: what the head scores.

        Without a KV cache, positions are 0..T-1 and attention is causal. With one (`set_kv_cache`),
        `input_pos` (B, T) says where each token sits in its row's sequence, and attention reads the
        first `kv_length` cache positions (at least the furthest input_pos + 1; by default the whole
        cache, the one shape a compiled step keeps): the caller knows it without a read from the device."""
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
                x = checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        return self.transformer.ln_f(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) of final hidden states x (..., C): the head's padding rows are cut."""
        if self.token_rows is not None:  # the special tokens' own rows score their ids
            return self.token_rows.head(x, self.lm_head, self.config.vocab_size)
        return self.lm_head(x)[..., : self.config.vocab_size]
