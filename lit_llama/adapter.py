"""LLaMA-Adapter (Zhang et al. 2023): a learned prompt that the upper layers attend to, gated by a
factor that starts at zero, so training starts from exactly the base model.

In each adapted layer every query also attends, without a causal mask and without positions, to the
keys and values the layer's own c_attn makes of `adapter_wte` (prompt_length learned vectors):

    y = attention(q, k, v) + gating_factor * attention(q, k_prompt, v_prompt)
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import BadValue
from lit_llama.lora import made_on
from lit_llama.model import CausalSelfAttention, LLaMA, LLaMAConfig


@dataclass
class AdapterConfig:
    """Adapter settings.

    Args:
        prompt_length: learned prompt vectors per adapted layer
        start_layer: layers from this index on get an adapter (the lower layers stay as they are)
    """

    prompt_length: int = 10
    start_layer: int = 2


class AdapterAttention(CausalSelfAttention):
    def __init__(self, config: LLaMAConfig, prompt_length: int) -> None:
        super().__init__(config)
        self.prompt_length = prompt_length
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        self.adapter_wte = nn.Embedding(self.prompt_length, self.n_head * self.head_size, device=device, dtype=dtype)
        nn.init.normal_(self.adapter_wte.weight, std=0.02)
        # one gate per head, zero: the adapter starts switched off
        self.gating_factor = nn.Parameter(torch.zeros(1, self.n_head, 1, 1, device=device, dtype=dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        y = super().attend(q, k, v, mask)  # (B, nh, T, hs)
        _, prompt_k, prompt_v = self.split_qkv(self.adapter_wte.weight.unsqueeze(0))  # (1, G, L, hs)
        B = q.shape[0]
        prompt_k, prompt_v = prompt_k.expand(B, -1, -1, -1), prompt_v.expand(B, -1, -1, -1)
        prompt = F.scaled_dot_product_attention(q, prompt_k, prompt_v, enable_gqa=self.n_query_groups != self.n_head)
        return y + self.gating_factor * prompt


def inject_adapter(model: LLaMA, config: AdapterConfig) -> None:
    """Give the layers from `config.start_layer` on an adapter, keeping their weights."""
    if not 0 <= config.start_layer < model.config.n_layer:
        raise BadValue(f"--adapter.start_layer {config.start_layer} must be in 0..{model.config.n_layer - 1}")
    for block in model.transformer.h[config.start_layer :]:
        old = block.attn
        with torch.device("meta"):  # no throwaway copies of the attention weights
            new = AdapterAttention(model.config, config.prompt_length)
        new.c_attn, new.c_proj = old.c_attn, old.c_proj
        new.reset_adapter_parameters(made_on(old.c_attn.weight), old.c_attn.weight.dtype)
        block.attn = new


def is_adapter_name(name: str) -> bool:
    """Adapter prompts and gates, and the special-token rows: all that trains, and all that is saved."""
    return "adapter_wte" in name or "gating_factor" in name or name.startswith("token_rows.")
