"""The training loop every finetune script shares: Fabric, gradient accumulation, warmup + cosine
learning rate, loss per supervised token, periodic validation, a progress bar and metrics.csv."""

import csv
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lit_llama.data import IGNORE_INDEX, TokenDataset, collate, shuffled_indices


@dataclass
class TrainArgs:
    """Training settings.

    Args:
        learning_rate: peak learning rate, reached after warmup
        min_learning_rate: where the cosine decay ends, at max_iters
        warmup_iters: optimizer steps of linear warmup
        max_iters: optimizer steps in all
        global_batch_size: samples per optimizer step, across devices
        micro_batch_size: samples per forward/backward on one device (gradients accumulate in between)
        weight_decay: AdamW weight decay
        grad_clip: largest gradient norm; 0 turns clipping off
        eval_interval: optimizer steps between validation runs (one also runs at the end)
        eval_iters: validation micro-batches per run; 0 uses the whole validation split
        seed: seed of the initialisation, dropout and data order
    """

    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0
    warmup_iters: int = 10
    max_iters: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 1337

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"--train.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"micro_batch_size x devices = {per_step}")
        return self.global_batch_size // per_step


def default_precision() -> str:
    """bf16 weights on a GPU that supports it, fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def lr_at_step(step: int, args: TrainArgs) -> float:
    """Linear warmup over `warmup_iters` steps, then cosine decay to `min_learning_rate` at `max_iters`."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.min_learning_rate + 0.5 * (args.learning_rate - args.min_learning_rate) * (1 + math.cos(math.pi * min(progress, 1.0)))


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy. logits: (B, T, V); labels: (B, T) aligned with the inputs."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts t + 1
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def n_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, data: TokenDataset, args: TrainArgs, pad_id: int) -> float:
    """Mean loss per supervised token over the first `eval_iters` micro-batches of `data`."""
    model.eval()
    starts = range(0, len(data), args.micro_batch_size)
    if args.eval_iters:
        starts = starts[: args.eval_iters]
    total, count = torch.zeros((), device=fabric.device), 0
    for start in starts:
        input_ids, labels = fabric.to_device(collate([data[i] for i in range(start, min(start + args.micro_batch_size, len(data)))], pad_id))
        total += loss_sum(model(input_ids), labels)
        count += n_targets(labels)
    model.train()
    return total.item() / max(count, 1)


def fit(fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: TokenDataset,
        val_data: TokenDataset, args: TrainArgs, out_dir: Path, pad_id: int = 0) -> dict[str, Optional[float]]:
    """Train for `args.max_iters` optimizer steps. Returns the last train and validation losses."""
    accumulation = args.accumulation_steps(fabric.world_size)
    # every rank walks the same shuffled order and takes its own share of it
    order = itertools.islice(shuffled_indices(len(train_data), args.seed), fabric.global_rank, None, fabric.world_size)
    columns = ["step", "train_loss", "val_loss", "learning_rate", "tokens_per_sec", "elapsed_sec"]
    metrics_file = open(out_dir / "metrics.csv", "w", newline="") if fabric.is_global_zero else None
    writer = csv.DictWriter(metrics_file, columns) if metrics_file else None
    if writer:
        writer.writeheader()
    last = {"train_loss": None, "val_loss": None}
    start_time = time.perf_counter()
    model.train()
    bar = tqdm(range(args.max_iters), desc="fine-tuning", unit="step", disable=not fabric.is_global_zero, dynamic_ncols=True)
    for step in bar:
        lr = lr_at_step(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        micro_batches = [collate([train_data[next(order)] for _ in range(args.micro_batch_size)], pad_id)
                         for _ in range(accumulation)]
        # normalise by the supervised tokens of the whole step on all ranks, not per micro-batch,
        # so padding and masked turns weigh nothing; x world_size undoes DDP's gradient averaging
        count = fabric.all_reduce(torch.tensor(sum(n_targets(y) for _, y in micro_batches), device=fabric.device), reduce_op="sum")
        scale = fabric.world_size / count.clamp(min=1)
        step_loss = torch.zeros((), device=fabric.device)
        for i, (input_ids, labels) in enumerate(micro_batches):
            input_ids, labels = fabric.to_device((input_ids, labels))
            with fabric.no_backward_sync(model, enabled=i < accumulation - 1):
                loss = loss_sum(model(input_ids), labels) * scale
                fabric.backward(loss)
            step_loss += loss.detach()
        if args.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        train_loss = fabric.all_reduce(step_loss, reduce_op="sum").item() / fabric.world_size
        tokens = sum(x.numel() for x, _ in micro_batches) * fabric.world_size
        tokens_per_sec = tokens / (time.perf_counter() - step_start)
        last["train_loss"] = train_loss
        row = {"step": step + 1, "train_loss": f"{train_loss:.4f}", "val_loss": "", "learning_rate": f"{lr:.3g}",
               "tokens_per_sec": f"{tokens_per_sec:.0f}", "elapsed_sec": f"{time.perf_counter() - start_time:.1f}"}
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            last["val_loss"] = validate(fabric, model, val_data, args, pad_id)
            row["val_loss"] = f"{last['val_loss']:.4f}"
        bar.set_postfix(loss=f"{train_loss:.3f}", val=row["val_loss"] or "-", tok_s=f"{tokens_per_sec:.0f}")
        if writer:
            writer.writerow(row)
            metrics_file.flush()
    bar.close()
    if metrics_file:
        metrics_file.close()
    return last
