"""Greedy decoding at batch 1 with a KV cache: ours (eager, and with compiled one-token steps) against
transformers' `generate` with its default (dynamic) cache and its static cache, on the same weights
and prompt. No stop ids on either side: every run decodes exactly `new_tokens` tokens.

Prefill is timed as a run that decodes one token; decoding is what `new_tokens` tokens add to it:
(new_tokens - 1) / (t(new_tokens) - t(1)).

    python benchmarks/decode.py --size 30M
    python benchmarks/decode.py --size 7B --device cuda --new_tokens 256   # on a GPU
"""

import time
from typing import Callable, Literal, Optional

import torch

from common import (BASE_VOCAB, build_hf, build_ours, default_dtype, environment, gpu_peaks, median, model_config,
                    ratio, report, run_worker, setup, sync, table, timed)
from lit_llama.cli import run
from lit_llama.generate import Decoder, Request, compile_step, decode, generate

Impl = Literal["ours", "ours-compiled", "hf", "hf-static"]
IMPLS = {"ours": "ours, eager", "ours-compiled": "ours, compiled steps", "hf": "transformers generate, default cache",
         "hf-static": "transformers generate, static cache"}


def decoder(impl: str, size: str, device: torch.device) -> tuple[Callable[[list[int], int], None], int]:
    """A function decoding n tokens after a prompt, and the bytes of weights one step reads."""
    config, dtype = model_config(size), default_dtype(device)
    if impl.startswith("ours"):
        model = build_ours(config, device, dtype).eval()
        if impl == "ours":
            def decode(prompt: list[int], n: int) -> None:
                assert len(generate(model, prompt, n).tokens) == n
        else:
            step = compile_step(model)  # compiled once; a cache of block_size positions keeps one shape

            @torch.inference_mode()
            def decode(prompt: list[int], n: int) -> None:
                with Decoder(model, 1, config.block_size, step) as decoder:
                    assert len(list(decode(decoder, Request(prompt, n)))) == n
    else:
        model = build_hf(config, device, dtype).eval()
        model.generation_config.eos_token_id = None  # decode every token asked for
        model.generation_config.pad_token_id = 0
        cache = {"cache_implementation": "static"} if impl == "hf-static" else {}

        @torch.inference_mode()
        def decode(prompt: list[int], n: int) -> None:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **cache)
            assert out.shape[1] == len(prompt) + n
    embedding = config.padded_vocab_size * config.n_embd  # a lookup: one row is read
    weights = (sum(p.numel() for p in model.parameters()) - embedding) * dtype.itemsize
    return decode, weights


def worker(impl: str, size: str, prompt_len: int, new_tokens: int, runs: int, threads: int, device: str) -> dict:
    device = setup(threads, device)
    decode, weights = decoder(impl, size, device)
    prompt = torch.randint(3, BASE_VOCAB, (prompt_len,)).tolist()
    sync(device)
    start = time.perf_counter()
    decode(prompt, new_tokens)  # warm-up; compiles the compiled variants
    first = time.perf_counter() - start
    prefill = median(timed(lambda: decode(prompt, 1), device, 1, runs))
    total = median(timed(lambda: decode(prompt, new_tokens), device, 0, runs))
    tokens_per_s = (new_tokens - 1) / (total - prefill)
    result = dict(impl=impl, first_run=first, prefill=prefill, tokens_per_s=tokens_per_s)
    peaks = gpu_peaks(device)
    if peaks:
        result["bandwidth"] = weights * tokens_per_s / peaks[1]
    return result


def main(size: str = "30M", prompt_len: int = 128, new_tokens: int = 64, runs: int = 3, threads: int = 2,
         device: str = "cpu", impl: Optional[Impl] = None) -> None:
    """Time greedy decoding of ours and of transformers' generate, each variant in its own process.

    Args:
        size: 30M, 120M (CPU) or 7B (GPU)
        prompt_len: tokens of the prompt
        new_tokens: tokens decoded per run
        runs: timed runs; the median counts
        threads: torch threads, the same in every process
        device: cpu or cuda
        impl: run one variant in this process and print its result as JSON
    """
    if impl is not None:
        report(worker(impl, size, prompt_len, new_tokens, runs, threads, device))
        return
    args = ["--size", size, "--prompt_len", str(prompt_len), "--new_tokens", str(new_tokens), "--runs", str(runs),
            "--threads", str(threads), "--device", device]
    results = {name: run_worker("decode.py", [*args, "--impl", name]) for name in IMPLS}
    hf = results["hf"]
    rows = []
    for name, r in results.items():
        row = [IMPLS[name], f"{r['prefill'] * 1e3:.1f}", f"{r['tokens_per_s']:.1f}",
               ratio(r["tokens_per_s"], hf["tokens_per_s"]), f"{r['first_run']:.1f}"]
        if "bandwidth" in r:
            row.append(f"{r['bandwidth']:.0%}")
        rows.append(row)
    columns = ["", "prefill (ms)", "decode tokens/s", "vs transformers default", "first run incl. compile (s)"]
    if "bandwidth" in hf:
        columns.append("of peak bandwidth")
    table(f"greedy decoding, batch 1, {size}, prompt {prompt_len} + {new_tokens} new tokens, {device}, "
          f"{threads} threads; {environment()}", columns, rows)


if __name__ == "__main__":
    run(main)
