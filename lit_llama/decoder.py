"""The KV cache as slots: each slot a sequence of its own length, read into (prefill) and stepped one
token at a time, all slots together (lit_llama/generate.py decodes requests on it).

    Decoder(model, batch_size, ...)     the slots: read(slot, prompt, keep), prefill, prefill_many, feed(tokens, read)
    one_slot(model, slot)               the cache seen as one of its slots, for a prompt read into it
    SlotRows(cache, slots, ...)         the cache seen as several of its slots, for prompts read together
    compile_step(model)                 the one-token step, compiled for where it runs (step_options)
"""

from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch._inductor import config as inductor_config
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lit_llama.errors import BadValue
from lit_llama.model import KVCache, LLaMA
from lit_llama.multi_lora import LoRABank, RowLoRALinear, RowTokenRows


def step_options(model: LLaMA) -> dict[str, Any]:
    """Inductor's options for the one-token step of `model`, by where it runs.

    - On a GPU the step is captured as a CUDA graph and replayed: one launch per step, not one per kernel.
    - On the CPU inductor freezes the weights into the graph and writes its own matrix products
      (`max_autotune`'s C++ template): they read weights about twice as fast as aten's matrix-vector
      product (benchmarks/RESULTS.md, section 7), for a copy of the weights in the template's
      layout and a longer compile.

    Frozen, the graph holds the model's tensors as they were when it compiled. So there is no freezing
    with several LoRAs (the LoRA each row uses changes from step to step) or with quantized weights
    (frozen, they would be dequantized once, into full-size copies)."""
    if model.lm_head.weight.device.type == "cuda":
        return {"triton.cudagraphs": True}
    several_loras = any(isinstance(m, (RowLoRALinear, RowTokenRows)) for m in model.modules())
    if several_loras or any(is_traceable_wrapper_subclass(p) for p in model.parameters()):  # NF4 blocks
        return {}
    return {"freezing": True, "max_autotune": True}


class CompiledStep:
    """The model compiled for one-token steps: their shapes never change (the KV cache is preallocated),
    so one graph serves every step. Prompts of any length still run eagerly. A step serves one Decoder:
    frozen, its graph holds the KV cache it first ran with, and another cache would compile it again.
    `backend` is torch.compile's, `options` inductor's (by default `step_options`): a test runs a GPU's
    step with a backend that records the graph and captures nothing."""

    def __init__(self, model: LLaMA, backend: Union[str, Callable] = "inductor",
                 options: Optional[dict[str, Any]] = None) -> None:
        options = dict(step_options(model) if options is None else options)
        # dynamo reads `freezing` from inductor's config while it traces, before the options reach inductor
        self.freezing = options.pop("freezing", False)
        self.graphs = options.get("triton.cudagraphs", False)
        self.compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend,
                                      options=(options or None) if backend == "inductor" else None)

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read: its memory may be reused
            return self.compiled(idx, input_pos, **kwargs).clone()  # the next replay overwrites the graph's output
        with inductor_config.patch(freezing=self.freezing):
            return self.compiled(idx, input_pos, **kwargs)


def compile_step(model: LLaMA) -> CompiledStep:
    """The one-token step of `model`, compiled for where it runs (`step_options`)."""
    return CompiledStep(model)


@contextmanager
def caches_seen_as(model: LLaMA, view: Callable[[KVCache], nn.Module]) -> Iterator[None]:
    """Each block's KV cache seen as `view(cache)` meanwhile: what a forward pass writes goes through it."""
    blocks = [block.attn for block in model.transformer.h]
    caches = [attn.kv_cache for attn in blocks]
    for attn, cache in zip(blocks, caches):
        attn.kv_cache = view(cache)
    try:
        yield
    finally:
        for attn, cache in zip(blocks, caches):
            attn.kv_cache = cache


def one_slot(model: LLaMA, slot: int) -> ContextManager[None]:
    """The model's KV cache seen as its one slot `slot` (batch 1): a prompt read meanwhile lands there,
    and the other slots are left as they are."""
    # views: writes reach the cache
    return caches_seen_as(model, lambda cache: KVCache(cache.k[slot : slot + 1], cache.v[slot : slot + 1]))


class SlotRows(nn.Module):
    """A KV cache seen as some of its slots, for prompts read into them in one forward pass: row i of the
    pass is slot `slots[i]`, and reads its slot's first `length` positions. Only the real tokens write,
    not the padding after a shorter prompt: `where` holds, for each, its index in the pass's (n * T)
    tokens, its slot and its position (indices made on the host, so nothing is read back)."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, length: int,
                 where: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.cache, self.slots, self.length, self.where = cache, slots, length, where

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (n, G, T, hs) -> the real tokens' (m, G, hs), written at their slots' positions
        token, slot, position = self.where
        self.cache.k[slot, :, position] = k.transpose(1, 2).flatten(0, 1)[token].to(self.cache.k.dtype)
        self.cache.v[slot, :, position] = v.transpose(1, 2).flatten(0, 1)[token].to(self.cache.v.dtype)
        return self.cache.k[self.slots, :, : self.length], self.cache.v[self.slots, :, : self.length]  # (n, G, S, hs)


def slot_rows(model: LLaMA, *args: Any) -> ContextManager[None]:
    """The model's KV cache seen as `SlotRows(cache, *args)` meanwhile."""
    return caches_seen_as(model, lambda cache: SlotRows(cache, *args))


class Decoder:
    """A model with a preallocated KV cache of `batch_size` slots and `max_seq_length` positions, and the
    ids each slot holds. Slots are independent sequences: each has its own length, and a prompt read
    into one slot leaves the others as they are. A prompt that starts with what its slot holds (the
    next turn of a chat, another sample) reads only the rest.

    Each slot's next position lives on the device beside the cache, and steps take their tokens as a
    device tensor: a step copies nothing from the host and reads nothing back.

    With a `bank` (several LoRAs on the model, lit_llama/multi_lora.py), each slot decodes with the LoRA
    its prompt was read with."""

    def __init__(self, model: LLaMA, batch_size: int = 1, max_seq_length: Optional[int] = None,
                 step: Optional[Callable[..., torch.Tensor]] = None, bank: Optional[LoRABank] = None) -> None:
        self.model = model
        self.max_seq_length = max_seq_length or model.config.block_size
        model.set_kv_cache(batch_size=batch_size, max_seq_length=self.max_seq_length)
        self.run_step = model if step is None else step  # what runs one-token steps: the model, or compile_step(model)
        self.compiled = step is not None
        self.device = model.lm_head.weight.device
        self.held: list[list[int]] = [[] for _ in range(batch_size)]  # the ids each slot's cache holds
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # where each slot's next token goes
        self.active = torch.zeros(batch_size, dtype=torch.bool, device=self.device)  # slots that hold a sequence
        self.bank = bank
        self.loras = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # each slot's index in bank.names
        self.lora_of = [0] * batch_size  # the same, as the host has them
        self.prefilled = 0  # prompt tokens read by the last `prefill` (the rest came from the cache)
        self.steps = 0  # one-token steps run

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.clear_kv_cache()

    @property
    def batch_size(self) -> int:
        return len(self.held)

    def reset(self) -> None:
        """Forget what every slot holds (after a failed step, whose writes to the cache are unknown)."""
        for slot in range(self.batch_size):
            self.release(slot)

    def release(self, slot: int) -> None:
        """`slot` holds nothing any more: its steps compute a throwaway token at position 0."""
        self.held[slot].clear()
        self.positions[slot] = 0
        self.active[slot] = False

    def prefill(self, slot: int, prompt: list[int], lora: int = 0) -> torch.Tensor:
        """Make `slot` hold `prompt`, reading only what it does not hold yet: positions past the common
        prefix are overwritten, and the causal mask never lets a token see a stale position after its
        own. The logits (V,) after the last prompt token; `read(slot, prompt, 0)` reads it all."""
        return self.prefill_many([slot], [prompt], [lora])[0]

    def prefill_many(self, slots: list[int], prompts: list[list[int]], loras: list[int]) -> torch.Tensor:
        """`prefill` for several slots in one forward pass: each prompt past what its slot holds, the shorter
        ones padded at the end (the padding writes nothing to the cache), and the head only at each
        prompt's last token. The logits (n, V)."""
        keeps = [min(common_prefix(self.held[slot], prompt), len(prompt) - 1) for slot, prompt in zip(slots, prompts)]
        keeps = self.assign(slots, prompts, loras, keeps)
        width = max(len(prompt) - keep for prompt, keep in zip(prompts, keeps))
        rows = [prompt[keep:] + [0] * (width - len(prompt) + keep) for prompt, keep in zip(prompts, keeps)]
        # a padding token sits at a position of its own row's, clamped into the cache; it writes nothing there
        positions = [[min(keep + t, self.max_seq_length - 1) for t in range(width)] for keep in keeps]
        idx = torch.tensor(rows, device=self.device)  # (n, width)
        input_pos = torch.tensor(positions, device=self.device)  # (n, width)
        real = [(i * width + t, slot, keep + t) for i, (slot, prompt, keep) in enumerate(zip(slots, prompts, keeps))
                for t in range(len(prompt) - keep)]
        where = tuple(torch.tensor(column, device=self.device) for column in zip(*real))  # 3 x (m,)
        index = torch.tensor(slots, device=self.device)
        self.use(self.loras[index])
        length = max(len(prompt) for prompt in prompts)
        with slot_rows(self.model, index, length, where):
            hidden = self.model.hidden(idx, input_pos, kv_length=length)  # (n, width, C)
        self.hold(slots, prompts, keeps)
        last = torch.tensor([len(prompt) - keep - 1 for prompt, keep in zip(prompts, keeps)], device=self.device)
        return self.model.head(hidden[torch.arange(len(slots), device=self.device), last])  # (n, V)

    def read(self, slot: int, prompt: list[int], keep: int, lora: int = 0) -> torch.Tensor:
        """Make `slot` hold `prompt`, keeping its first `keep` positions (none if it held them for another
        LoRA than `lora`, the index in the bank's names it decodes with): the final hidden states
        (T - keep, C) of the rest."""
        [keep] = self.assign([slot], [prompt], [lora], [keep])
        idx = torch.tensor([prompt[keep:]], device=self.device)  # (1, T - keep)
        input_pos = torch.arange(keep, len(prompt), device=self.device).unsqueeze(0)  # (1, T - keep)
        self.use(self.loras[slot : slot + 1])
        with one_slot(self.model, slot):
            hidden = self.model.hidden(idx, input_pos, kv_length=len(prompt))  # (1, T - keep, C)
        self.hold([slot], [prompt], [keep])
        return hidden[0]

    def assign(self, slots: list[int], prompts: list[list[int]], loras: list[int], keeps: list[int]) -> list[int]:
        """Before `prompts` are read into `slots`: check that they fit, give each slot its LoRA, and return how
        many positions each slot keeps: its `keeps`, or none where it held them for another LoRA (the keys
        and values another LoRA computed are another model's)."""
        kept = []
        for slot, prompt, lora, keep in zip(slots, prompts, loras, keeps):
            if not 0 < len(prompt) <= self.max_seq_length:
                raise BadValue(f"a prompt of {len(prompt)} tokens does not fit in the KV cache of {self.max_seq_length}")
            kept.append(keep if lora == self.lora_of[slot] else 0)
            self.lora_of[slot] = lora
        self.loras[torch.tensor(slots, device=self.device)] = torch.tensor(loras, device=self.device)
        return kept

    def hold(self, slots: list[int], prompts: list[list[int]], keeps: list[int]) -> None:
        """Once `prompts` are read into `slots` (past their `keeps`): what each holds, and where its next token goes."""
        for slot, prompt, keep in zip(slots, prompts, keeps):
            del self.held[slot][keep:]
            self.held[slot].extend(prompt[keep:])
        index = torch.tensor(slots, device=self.device)
        self.positions[index] = torch.tensor([len(prompt) for prompt in prompts], device=self.device)
        self.active[index] = True
        self.prefilled = sum(len(prompt) - keep for prompt, keep in zip(prompts, keeps))

    def feed(self, tokens: torch.Tensor, read: list[Optional[int]]) -> torch.Tensor:
        """Append one token to each slot in one step: `tokens` (B,) on the device, `read` the same ids as
        the host has them, None for a slot with nothing to decode (it is released). The logits (B, V)."""
        for slot, token in enumerate(read):
            if token is None:
                if self.held[slot]:
                    self.release(slot)
            elif len(self.held[slot]) >= self.max_seq_length:
                raise ValueError(f"a sequence of {len(self.held[slot]) + 1} tokens does not fit in the KV cache of "
                                 f"{self.max_seq_length}")
        # eager steps attend as far as the furthest slot reaches; a compiled one keeps the cache's shape
        kv_length = None if self.compiled else max(len(held) for held in self.held) + 1
        self.use(self.loras)
        logits = self.run_step(tokens.view(-1, 1), self.positions.view(-1, 1), kv_length=kv_length)[:, -1]
        self.positions += self.active
        for held, token in zip(self.held, read):
            if token is not None:
                held.append(token)
        self.steps += 1
        return logits

    def use(self, loras: torch.Tensor) -> None:
        """The next forward passes add the updates of `loras` (an index in the bank's names per row)."""
        if self.bank is not None:
            self.bank.rows = loras


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
