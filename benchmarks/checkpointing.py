"""Activation checkpointing: what it saves in peak memory and what it costs in step time, ours beside
transformers' gradient checkpointing, on the same weights and batches (`finetune.py`'s step, each
run in its own process, with and without).

    python benchmarks/checkpointing.py --size 120M --method lora
"""

from typing import Literal

from common import environment, mib, ratio, run_worker, table
from lit_llama.cli import run


def main(method: Literal["lora", "full"] = "lora", size: str = "120M", batch_size: int = 2, seq_len: int = 512,
         warmup: int = 1, runs: int = 3, threads: int = 2, device: str = "cpu") -> None:
    """Time fine-tuning steps with and without activation checkpointing, ours and transformers'.

    Args:
        method: lora (q and v, r=8, plus the EOT rows) or full
        size: 30M, 120M (CPU) or 7B (GPU)
        batch_size: sequences per step
        seq_len: tokens per sequence
        warmup: steps before timing
        runs: timed steps; the median counts
        threads: torch threads, the same in every process
        device: cpu or cuda
    """
    args = ["--method", method, "--size", size, "--batch_size", str(batch_size), "--seq_len", str(seq_len),
            "--warmup", str(warmup), "--runs", str(runs), "--threads", str(threads), "--device", device]
    results = {(impl, on): run_worker("finetune.py", [*args, "--impl", impl, "--activation_checkpointing", str(on).lower()])
               for impl in ("ours", "hf") for on in (False, True)}
    for (impl, on), result in results.items():
        first = results["ours", False]["first_loss"]
        if abs(result["first_loss"] - first) > 1e-3 * abs(first):
            raise SystemExit(f"the first losses differ: {first} and {impl} (checkpointing {on}) {result['first_loss']}")
    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    rows = []
    for impl, name in (("ours", "ours"), ("hf", "transformers + peft" if method == "lora" else "transformers")):
        off, on = results[impl, False], results[impl, True]
        rows.append([name, f"{off['tokens_per_s']:,.0f}", f"{on['tokens_per_s']:,.0f}",
                     ratio(on["seconds"], off["seconds"]), mib(off["peak_memory"]), mib(on["peak_memory"]),
                     mib(off["peak_memory"] - on["peak_memory"])])
    table(f"activation checkpointing, {method} fine-tuning step, {size}, batch {batch_size} x {seq_len} tokens, "
          f"{device}, precision {results['ours', False]['precision']}, {threads} threads; {environment()}",
          ["", "tokens/s without", "tokens/s with", "step time with / without", f"{memory} without",
           f"{memory} with", "saved"], rows)


if __name__ == "__main__":
    run(main)
