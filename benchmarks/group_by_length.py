"""LoRA training throughput with and without `--train.group_by_length`, on samples of LIMA-like
lengths: the same model, samples and micro-batch size; only the order that fills the micro-batches
differs. Tokens/s counts real tokens (not padding), as training reports it.

Lengths are log-normal (median 300 tokens, clipped to 16..512), like LIMA's conversations cut at a
512-token context. Each variant runs in its own process, `steps` steps after one warm-up step.

    python benchmarks/group_by_length.py --size 30M
"""

import itertools
import time
from typing import Optional

import torch

from common import EOT_ID, SEED, build_ours, environment, median, model_config, report, run_worker, setup, table
from lit_llama.batches import Mixture, collate
from lit_llama.cli import run
from lit_llama.dataset import TokenDataset
from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.methods import prepare_model
from lit_llama.training import TrainArgs, micro_batches_of_rank, n_targets, next_token_targets

LORA = LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, value=True)


def lima_like(n: int, block_size: int) -> TokenDataset:
    """`n` samples of random ids with LIMA-like lengths, every token a target."""
    generator = torch.Generator().manual_seed(SEED)
    lengths = (torch.randn(n, generator=generator) * 0.6 + 5.7).exp().round().clamp(16, block_size).long()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    ids = torch.randint(3, 32000, (total,), generator=generator, dtype=torch.int32)
    return TokenDataset(ids, torch.ones(total, dtype=torch.bool), offsets)


def worker(grouped: bool, size: str, samples: int, micro_batch_size: int, steps: int, threads: int) -> dict:
    setup(threads, "cpu")
    config = model_config(size)
    data = lima_like(samples, config.block_size)
    model = build_ours(config, torch.device("cpu"), torch.float32)
    prepare_model(model, "lora", LORA, [EOT_ID])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    args = TrainArgs(global_batch_size=micro_batch_size, micro_batch_size=micro_batch_size, group_by_length=grouped,
                     seed=SEED)
    order = micro_batches_of_rank(Mixture(data), args, 1, 0)
    rates, padded, real_total = [], 0, 0
    for batch in itertools.islice(order, steps + 1):
        input_ids, labels = collate([data[i] for i in batch], pad_id=2)
        real = int(data.lengths[batch].sum())
        padded += input_ids.numel() - real
        real_total += real
        start = time.perf_counter()
        loss = loss_sum(model, input_ids, next_token_targets(labels)) / n_targets(labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(real / (time.perf_counter() - start))
    return dict(grouped=grouped, tokens_per_s=median(rates[1:]), padding=padded / (padded + real_total))


def main(size: str = "30M", samples: int = 1000, micro_batch_size: int = 4, steps: int = 40, threads: int = 2,
         grouped: Optional[bool] = None) -> None:
    """Train `steps` LoRA steps with random and with length-grouped micro-batches, each in its own process.

    Args:
        size: 30M or 120M
        samples: samples in the dataset the batches are drawn from
        micro_batch_size: samples per step (one micro-batch per step)
        steps: timed steps
        threads: torch threads, the same in every process
        grouped: run one variant in this process and print its result as JSON
    """
    if grouped is not None:
        report(worker(grouped, size, samples, micro_batch_size, steps, threads))
        return
    args = ["--size", size, "--samples", str(samples), "--micro_batch_size", str(micro_batch_size), "--steps",
            str(steps), "--threads", str(threads)]
    plain = run_worker("group_by_length.py", [*args, "--grouped", "false"])
    grouped_result = run_worker("group_by_length.py", [*args, "--grouped", "true"])
    rows = [[name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x", f"{r['padding']:.0%}"]
            for name, r in (("random micro-batches", plain), ("--train.group_by_length", grouped_result))]
    table(f"LoRA steps on LIMA-like lengths, {size}, micro-batch {micro_batch_size}, {steps} steps, cpu, {threads} threads; "
          f"{environment()}", ["", "real tokens/s", "vs random", "padding"], rows)


if __name__ == "__main__":
    run(main)
