"""Peak memory of a LoRA step on a 4-bit NF4 base (QLoRA) against a bf16 and an fp32 base, same batch,
at TinyLlama-1.1B's shape with random weights; and the time to quantize the base. Each base in its
own process (peak RSS is per process).

LoRA on q and v (r=8, alpha=16, no dropout) plus the EOT's rows, as `benchmarks/finetune.py`; the
bf16 and nf4 bases compute under bf16 autocast, as `--precision bf16-true` trains. The base is built
in its dtype (the nf4 one in bf16, then quantized) and the peak is counted from after that: the
step's own memory, the weights included. On the CPU the workers run with glibc's mmap threshold at
128 KiB, and the heap is trimmed before the peak is reset, so that peak RSS counts live tensors, as
a GPU's allocated-memory peak does (see `main`). The CPU's peak RSS includes the process itself
(torch's, Lightning's and torchao's libraries): the table also gives the peak less the RSS after the
imports, the part a GPU's figure would count.

    python benchmarks/qlora.py
    python benchmarks/qlora.py --size 7B --device cuda --seq_len 2048   # on a GPU
"""

import ctypes
import gc
import os
from typing import Literal, Optional

import torch

from common import (EOT_ID, autocast, batch, build_ours, clock, environment, flags, median, mib, model_config,
                    peak_memory, report, reset_peak_memory, rss_bytes, run_worker, setup, table)
from lit_llama.cli import run
from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.precision import TrainPrecision, frozen_dtype, set_training_dtypes
from lit_llama.quantize import quantize
from lit_llama.methods import prepare_model
from lit_llama.training import n_targets, next_token_targets

LORA = LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, value=True)
Base = Literal["fp32", "bf16", "nf4"]
BASES = {"fp32": "fp32 base", "bf16": "bf16 base", "nf4": "NF4 base (QLoRA)"}


def worker(*, base: Base, size: str, batch_size: int, seq_len: int, steps: int, threads: int, device: str) -> dict:
    device = setup(threads, device)
    imported = rss_bytes() if device.type == "cpu" else 0  # a GPU counts its allocations only
    config = model_config(size)
    precision: TrainPrecision = "32-true" if base == "fp32" else "bf16-true"
    model = build_ours(config, device, frozen_dtype(precision))
    prepare_model(model, "lora", LORA, [EOT_ID])
    set_training_dtypes(model, precision)
    start = clock(device)
    quantize(model, "nf4" if base == "nf4" else None)
    quantize_seconds = clock(device) - start
    if device.type == "cpu":  # hand the dense weights the quantization freed back to the OS, as a GPU's allocator would
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, labels = batch(batch_size, seq_len, device)
    times = []
    for _ in range(steps):
        start = clock(device)
        with autocast(precision, device):
            loss = loss_sum(model, ids, next_token_targets(labels)) / n_targets(labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(clock(device) - start)
    return dict(base=base, peak=peak_memory(device), imported=imported, quantize_seconds=quantize_seconds,
                step_seconds=median(times[1:]), loss=loss.item())


def main(*, size: str = "1.1B", batch_size: int = 1, seq_len: int = 256, steps: int = 3, threads: int = 2,
         device: str = "cpu", base: Optional[Base] = None) -> None:
    """Measure each base in its own process and print the table.

    Args:
        size: 1.1B (CPU) or 7B (GPU)
        batch_size: sequences per step
        seq_len: tokens per sequence
        steps: LoRA steps run (the first is not timed)
        threads: torch threads, the same in every process
        device: cpu or cuda
        base: run one base in this process and print its result as JSON
    """
    if base is not None:
        report(worker(base=base, size=size, batch_size=batch_size, seq_len=seq_len, steps=steps, threads=threads,
                      device=device))
        return
    args = flags(size=size, batch_size=batch_size, seq_len=seq_len, steps=steps, threads=threads, device=device)
    # glibc serves allocations from 128 KiB up with mmap and unmaps them when freed, so the RSS follows the
    # live tensors (what a GPU's max_memory_allocated counts), not the heap's high-water mark: dequantizing
    # a layer makes large temporaries, and a heap that keeps them would count them once per layer
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    results = {name: run_worker("qlora.py", [*args, *flags(base=name)]) for name in BASES}
    bf16 = results["bf16"]
    net = {name: r["peak"] - r["imported"] for name, r in results.items()}
    rows = [[BASES[name], mib(r["peak"]), f"{r['peak'] / bf16['peak']:.2f}x", mib(net[name]),
             f"{net[name] / net['bf16']:.2f}x", f"{r['step_seconds']:.1f}",
             f"{r['quantize_seconds']:.1f}" if name == "nf4" else "-", f"{r['loss']:.4f}"] for name, r in results.items()]
    table(f"LoRA step on a quantized base, {size}, batch {batch_size} x {seq_len} tokens, {device}, {threads} threads; "
          f"{environment()}", ["", "peak memory", "vs bf16 base", "peak less imports",
                                     "vs bf16 base", "step (s)", "quantizing the base (s)", "last loss"], rows)


if __name__ == "__main__":
    run(main)
