"""Decoding with a KV cache: the prompt is read once (prefill), then one token per step until a stop
id (the end-of-turn token, EOS as fallback) or `max_new_tokens`."""

import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the stop id
    stop_id: Optional[int]  # the stop id that ended decoding; None if max_new_tokens did


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One id from the logits (V,) of the last position: greedy at temperature 0, else top-k sampling."""
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(model: LLaMA, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, stop_ids: tuple[int, ...] = (), generator: Optional[torch.Generator] = None) -> Generation:
    device = model.lm_head.weight.device
    T = len(prompt_ids)
    max_new_tokens = min(max_new_tokens, model.config.block_size - T)
    if max_new_tokens <= 0:
        raise ValueError(f"the prompt has {T} tokens: no room left in the model's context of {model.config.block_size}")
    model.set_kv_cache(batch_size=1, max_seq_length=T + max_new_tokens)
    try:
        input_pos = torch.arange(T, device=device)
        idx = torch.tensor([prompt_ids], device=device)  # (1, T)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(idx, input_pos)[0, -1]  # (V,)
            next_id = sample(logits, temperature, top_k, generator)  # (1,)
            token = int(next_id)
            if token in stop_ids:
                return Generation(tokens, token)
            tokens.append(token)
            idx, input_pos = next_id.view(1, 1), input_pos[-1:] + 1
        return Generation(tokens, None)
    finally:
        model.clear_kv_cache()


def stop_reason(generation: Generation, tokenizer: Tokenizer) -> str:
    """Why decoding ended: "eot", "eos", or "max_new_tokens"."""
    if generation.stop_id is None:
        return "max_new_tokens"
    if generation.stop_id == tokenizer.eot_id:
        return "eot"
    if generation.stop_id == tokenizer.eos_id:
        return "eos"
    return f"stop id {generation.stop_id}"


def inference_device_dtype() -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU that supports it, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def reply(model: LLaMA, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
          top_k: Optional[int] = 200, seed: int = 1234) -> None:
    """What a generate script does once its model is loaded: format `prompt` as one user turn exactly
    as in training, decode until a stop id, print the reply on stdout and why it stopped on stderr."""
    device, dtype = inference_device_dtype()
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    result = generate(model, encode_prompt(tokenizer, [prompt]), max_new_tokens, temperature=temperature, top_k=top_k,
                      stop_ids=tuple(tokenizer.stop_ids), generator=generator)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(result.tokens))
    print(f"stop reason: {stop_reason(result, tokenizer)} after {len(result.tokens)} tokens "
          f"({len(result.tokens) / elapsed:.1f} tokens/s)", file=sys.stderr)
