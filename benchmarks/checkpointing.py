"""Activation checkpointing: what it saves in peak memory and what it costs in step time, ours beside
transformers' gradient checkpointing, on the same weights and batches (`finetune.py`'s step, each
run in its own process, with and without).

    python benchmarks/checkpointing.py --size 120M --method lora
"""

from common import TrainStep, environment, flags, mib, ratio, run_worker, table
from lit_llama.cli import run


def main(step: TrainStep = TrainStep(size="120M")) -> None:
    """Time fine-tuning steps with and without activation checkpointing, ours and transformers'."""
    results = {(impl, on): run_worker("finetune.py", [*step.flags(), *flags(impl=impl, activation_checkpointing=on)])
               for impl in ("ours", "hf") for on in (False, True)}
    for (impl, on), result in results.items():
        first = results["ours", False]["first_loss"]
        if abs(result["first_loss"] - first) > 1e-3 * abs(first):
            raise SystemExit(f"the first losses differ: {first} and {impl} (checkpointing {on}) {result['first_loss']}")
    memory = "peak GPU memory" if step.device == "cuda" else "peak RSS"
    rows = []
    for impl, name in (("ours", "ours"), ("hf", "transformers + peft" if step.method == "lora" else "transformers")):
        off, on = results[impl, False], results[impl, True]
        rows.append([name, f"{off['tokens_per_s']:,.0f}", f"{on['tokens_per_s']:,.0f}",
                     ratio(on["seconds"], off["seconds"]), mib(off["peak_memory"]), mib(on["peak_memory"]),
                     mib(off["peak_memory"] - on["peak_memory"])])
    table(f"activation checkpointing, {step.method} fine-tuning step, {step.size}, batch {step.batch_size} x "
          f"{step.seq_len} tokens, {step.device}, precision {results['ours', False]['precision']}, {step.threads} "
          f"threads; {environment()}",
          ["", "tokens/s without", "tokens/s with", "step time with / without", f"{memory} without",
           f"{memory} with", "saved"], rows)


if __name__ == "__main__":
    run(main)
