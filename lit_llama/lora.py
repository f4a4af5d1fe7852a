"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, scaled by alpha / r.

    y = x W^T + dropout(x) A^T B^T * (alpha / r),   A: (r, in), B: (out, r), B starts at zero

The fused `c_attn` (q | k | v) gets an update only on the chunks asked for, so "LoRA on q and v"
means the same thing it does with separate q_proj/k_proj/v_proj layers.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import BadValue
from lit_llama.model import LLaMA


@dataclass
class LoRAConfig:
    """LoRA settings.

    Args:
        r: rank of the update
        alpha: the update is scaled by alpha / r
        dropout: dropout on the LoRA branch's input
        query: adapt the query part of attn.c_attn
        key: adapt the key part of attn.c_attn
        value: adapt the value part of attn.c_attn
        projection: adapt attn.c_proj
        mlp: adapt mlp.c_fc1, mlp.c_fc2 and mlp.c_proj
        head: adapt lm_head
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise BadValue(f"LoRA rank r must be positive, got {self.r}")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head)):
            raise BadValue("LoRA needs at least one target: query, key, value, projection, mlp or head")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 chunks: Optional[list[int]] = None, enabled: Optional[list[bool]] = None) -> None:
        """`chunks` splits the output features (e.g. the q, k, v sizes of c_attn); `enabled` says
        which of them get a low-rank update. By default the whole output does."""
        super().__init__(in_features, out_features, bias=False)
        chunks = chunks or [out_features]
        enabled = enabled or [True] * len(chunks)
        starts = [sum(chunks[:i]) for i in range(len(chunks))]
        self.lora_slices = [(start, size) for start, size, on in zip(starts, chunks, enabled) if on]
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        # one A block and one B block per enabled chunk, stacked
        self.lora_A = nn.Parameter(torch.empty(r * len(self.lora_slices), in_features))
        self.lora_B = nn.Parameter(torch.zeros(sum(size for _, size in self.lora_slices), r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        after_a = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # (..., r * n_enabled)
        # one matmul for every chunk's update, then one add: no in-place writes into slices of the output
        return F.linear(x, self.weight).add_(F.linear(after_a, self.block_b()))

    def block_b(self) -> torch.Tensor:
        """The B blocks laid out as one (out_features, r * n_enabled) matrix: enabled chunk i takes
        columns [i * r, (i + 1) * r) of its own rows; every other entry is zero."""
        n, r = len(self.lora_slices), self.r
        if n == 1 and self.lora_slices[0] == (0, self.out_features):
            return self.lora_B
        parts, end, b_start = [], 0, 0
        for i, (start, size) in enumerate(self.lora_slices):
            parts.append(self.lora_B.new_zeros(start - end, n * r))
            parts.append(F.pad(self.lora_B[b_start : b_start + size], (i * r, (n - 1 - i) * r)))
            end, b_start = start + size, b_start + size
        parts.append(self.lora_B.new_zeros(self.out_features - end, n * r))
        return torch.cat(parts)

    def delta_weight(self) -> torch.Tensor:
        """The update as a full (out, in) fp32 matrix: B @ A * scaling on the enabled rows."""
        delta = torch.zeros_like(self.weight, dtype=torch.float32)
        b_start = 0
        for i, (start, size) in enumerate(self.lora_slices):
            a_i = self.lora_A[i * self.r : (i + 1) * self.r].float()
            b_i = self.lora_B[b_start : b_start + size].float()
            delta[start : start + size] = b_i @ a_i * self.scaling
            b_start += size
        return delta


def made_on(base_weight: torch.Tensor) -> torch.device:
    """Where the parameters a method adds beside `base_weight` are made: beside it, or on the CPU while the
    base waits on the meta device to be loaded shard by shard (fsdp). They draw from the same random
    stream either way, so a sharded run starts from the one-process run's values."""
    return torch.device("cpu") if base_weight.is_meta else base_weight.device


def _lora_linear(old: nn.Linear, config: LoRAConfig, chunks: Optional[list[int]] = None,
                 enabled: Optional[list[bool]] = None) -> LoRALinear:
    with torch.device(made_on(old.weight)):
        new = LoRALinear(old.in_features, old.out_features, r=config.r, alpha=config.alpha, dropout=config.dropout,
                         chunks=chunks, enabled=enabled)
    new.weight = old.weight  # shared, not copied
    return new.to(old.weight.dtype)


def inject_lora(model: LLaMA, config: LoRAConfig) -> None:
    """Replace the target linear layers of `model` by LoRALinear layers holding the same weights."""
    c = model.config
    qkv_chunks = [c.n_head * c.head_size, c.n_query_groups * c.head_size, c.n_query_groups * c.head_size]
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        if config.query or config.key or config.value:
            attn.c_attn = _lora_linear(attn.c_attn, config, qkv_chunks, [config.query, config.key, config.value])
        if config.projection:
            attn.c_proj = _lora_linear(attn.c_proj, config)
        if config.mlp:
            mlp.c_fc1, mlp.c_fc2, mlp.c_proj = (_lora_linear(m, config) for m in (mlp.c_fc1, mlp.c_fc2, mlp.c_proj))
    if config.head:
        model.lm_head = _lora_linear(model.lm_head, config)


def is_lora_name(name: str) -> bool:
    """LoRA matrices and the special-token rows: all that trains, and all that is saved."""
    return "lora_" in name or name.startswith("token_rows.")


@torch.no_grad()
def merge_lora(model: LLaMA) -> None:
    """Fold every LoRA update into its weight and put plain nn.Linear layers back."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                # added in fp32 and rounded once to the weight's dtype: rounding the update to bf16 first, then
                # the sum, would round twice
                merged = (child.weight.float() + child.delta_weight()).to(child.weight.dtype)
                plain.weight = nn.Parameter(merged, requires_grad=False)
                setattr(parent, name, plain)
