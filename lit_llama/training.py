"""The training loop every finetune script runs (`finetune.py` sets it up): gradient accumulation (no
gradient sync until the last micro-batch), loss per supervised token of the whole step, linear warmup
then a cosine or linear decay, fp16 steps that overflow skipped, periodic validation (its loss at
end-of-turn tokens apart) with one sample generation, a progress bar and a metrics row per step.
The rooms beside it: `batches.py` (what each step draws, a mixed-in split included), `outdir.py`
(checkpoints that resume exactly, and stopping early, resumably), `metrics.py` (what a
run records).
"""

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from lit_llama.batches import Mixture, collate, length_grouped_batches, random_batches
from lit_llama.dataset import IGNORE_INDEX, TokenDataset
from lit_llama.errors import BadValue
from lit_llama.generate import generate, stop_reason
from lit_llama.loss import head_loss
from lit_llama.outdir import OutDir, StopOnSignal, stopped_on_nan
from lit_llama.precision import grad_scaler
from lit_llama.prompts import first_exchange
from lit_llama.tokenizer import Tokenizer

MAX_SKIPPED_STEPS = 50  # consecutive fp16 overflows before the run gives up
NO_LOSSES = {"train_loss": None, "val_loss": None, "val_eot_loss": None, "stopped_by": None}


@dataclass
class TrainArgs:
    """Training settings.

    Args:
        learning_rate: peak learning rate, reached after warmup
        min_learning_rate: where the decay ends, at the last step
        lr_schedule: how the learning rate decays after warmup: cosine, or linear (LIMA's)
        warmup_iters: optimizer steps of linear warmup (0: start at the peak)
        max_iters: optimizer steps in all
        epochs: train for this many passes over the data instead of max_iters (with --mix_dir, a pass is
            every task sample and its share of the mix)
        global_batch_size: samples per optimizer step, across devices
        micro_batch_size: samples per forward/backward on one device (gradients accumulate in between)
        group_by_length: fill each micro-batch with samples of similar length (less padding, faster
            steps); each epoch still sees every sample once, in random batches
        weight_decay: AdamW weight decay
        residual_dropout: dropout on each block's residual branches, rising linearly from 0 at the first
            block to this at the last (LIMA: 0.3 for 65B, 0.2 for smaller models); 0 turns it off
        grad_clip: largest gradient norm; 0 turns clipping off
        eval_interval: optimizer steps between validation runs (one also runs at the end)
        eval_iters: validation micro-batches per run; 0 uses the whole validation split
        save_interval: optimizer steps between checkpoints (one is also written at the end); 0: only at the end
        seed: seed of the initialisation, dropout and data order
        token_lr_scale: the special tokens' embedding and head rows learn at learning_rate x this: a new
            token has to become the likeliest one at every turn's end, and at the rate that suits the
            other weights its two rows move too slowly
    """

    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    warmup_iters: int = 10
    max_iters: int = 200
    epochs: Optional[float] = None
    global_batch_size: int = 16
    micro_batch_size: int = 4
    group_by_length: bool = False
    weight_decay: float = 0.0
    residual_dropout: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 10
    save_interval: int = 100
    seed: int = 1337
    token_lr_scale: float = 1.0

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise BadValue(f"--train.global_batch_size={self.global_batch_size} is not a multiple of "
                           f"micro_batch_size x devices = {per_step}")
        return self.global_batch_size // per_step

    def total_steps(self, epoch_size: int) -> int:
        if self.epochs is None:
            return self.max_iters
        return math.ceil(self.epochs * epoch_size / self.global_batch_size)


def lr_at_step(step: int, args: TrainArgs, total_steps: int) -> float:
    """Linear warmup over `warmup_iters` steps, then a cosine or linear decay to `min_learning_rate` at
    `total_steps`."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = min((step - args.warmup_iters) / max(1, total_steps - args.warmup_iters), 1.0)
    left = 1 - progress if args.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return args.min_learning_rate + (args.learning_rate - args.min_learning_rate) * left


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels: (B, T) aligned with the inputs -> targets (B, T): position t predicts label t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def n_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def param_groups(model: torch.nn.Module, token_lr_scale: float) -> list[dict]:
    """What trains, as AdamW groups whose learning rate is the schedule's times "lr_scale": the special
    tokens' own rows (`model.token_rows`) at `token_lr_scale`, everything else at 1."""
    rows, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rows if "token_rows." in name else rest).append(param)
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": rows, "lr_scale": token_lr_scale}]
    return [group for group in groups if group["params"]]


def group_targets(labels: torch.Tensor, mixed: Optional[torch.Tensor]) -> list[int]:
    """The supervised tokens of a micro-batch: [all], or [the task's rows', the mixed-in rows'] (`mixed` (B,))."""
    return [n_targets(labels)] if mixed is None else [n_targets(labels[~mixed]), n_targets(labels[mixed])]


def summed_losses(fabric: L.Fabric, model: torch.nn.Module, input_ids: torch.Tensor,
                  targets: torch.Tensor, groups: Optional[torch.Tensor] = None, n_groups: int = 1) -> torch.Tensor:
    """The summed cross-entropy per group (n_groups,) of `model` (set up by Fabric) on input_ids (B, T). The
    hidden states run through the strategy's wrapper; the head and loss beside it (`head_loss`), under
    the same autocast as a forward pass."""
    with fabric.autocast():
        return head_loss(model.module, model.hidden(input_ids), targets, groups, n_groups)


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, data: TokenDataset, args: TrainArgs, pad_id: int,
             eot_id: int) -> tuple[float, Optional[float]]:
    """Mean loss per supervised token over the first `eval_iters` micro-batches of `data` (all of them
    with eval_iters 0), and the mean over the end-of-turn targets alone: how well the model learns to
    stop (None when no target is one). Each rank scores its own share of the micro-batches, and the
    sums are added across ranks."""
    model.eval()
    starts = range(0, len(data), args.micro_batch_size)
    if args.eval_iters:
        starts = starts[: args.eval_iters]
    mine = starts[fabric.global_rank :: fabric.world_size]
    sums = torch.zeros(4, device=fabric.device)  # loss, supervised tokens, loss at EOT targets, EOT targets
    for i in range(math.ceil(len(starts) / fabric.world_size)):
        # a rank whose share is used up scores the first batch again, uncounted: under ddp and fsdp
        # every rank must run every forward pass
        start, counted = (mine[i], 1.0) if i < len(mine) else (starts[0], 0.0)
        samples = [data[j] for j in range(start, min(start + args.micro_batch_size, len(data)))]
        input_ids, labels = fabric.to_device(collate(samples, pad_id))
        targets = next_token_targets(labels)
        at_eot = targets == eot_id
        losses = summed_losses(fabric, model, input_ids, targets, at_eot.long(), 2)  # (elsewhere, at EOT)
        # counted where the losses are: nothing is read back until the end
        counts = torch.stack([(targets != IGNORE_INDEX).sum(), at_eot.sum()]).to(sums)
        sums += torch.stack([losses.sum(), counts[0], losses[1], counts[1]]) * counted
    loss, count, eot_loss, eot_count = fabric.all_reduce(sums, reduce_op="sum").tolist()
    model.train()
    return loss / max(count, 1), eot_loss / eot_count if eot_count else None


def sample_reply(model: torch.nn.Module, data: TokenDataset, tokenizer: Tokenizer) -> str:
    """Greedy reply to the prompt of the first validation sample's first reply (`first_exchange`), and
    why it stopped."""
    ids, loss_mask = data[0]
    prompt = first_exchange(tokenizer, ids.tolist(), loss_mask.tolist())[0]
    model.eval()
    result = generate(model, prompt, max_new_tokens=64, stop_ids=tuple(tokenizer.stop_ids))
    model.train()
    return f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(result.tokens)!r} [{stop_reason(result, tokenizer)}]"


def optimizer_step(fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   grad_clip: float, step: int, state: Path) -> tuple[float, bool]:
    """Clip the gradients (0: don't) and take training step `step`. Returns the gradient norm and whether
    the step was skipped: under fp16 loss scaling, gradients that overflowed are normal, and the GradScaler
    skips the step and lowers the scale. Without a scaler, a non-finite norm stops training, naming the
    training `state` to resume from."""
    scaler = grad_scaler(fabric.strategy.precision)
    norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip if grad_clip > 0 else math.inf,
                                 error_if_nonfinite=False)  # unscales first under fp16
    norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    if not math.isfinite(norm) and scaler is None:
        optimizer.zero_grad(set_to_none=True)
        raise stopped_on_nan("gradient norm", norm, step, state)
    optimizer.step()  # under fp16, GradScaler's step: skipped if the gradients overflowed
    optimizer.zero_grad(set_to_none=True)
    return norm, not math.isfinite(norm)


def micro_batches_of_rank(data: Mixture, args: TrainArgs, world_size: int, rank: int,
                          start_step: int = 0) -> Iterator[list[int]]:
    """The sample indices of each micro-batch `rank` trains on, from `start_step` on. Every rank walks
    the same order of micro-batches (consecutive samples of the shuffled epochs, or length-grouped) and
    takes every world_size-th; a resumed run skips what the steps before it used."""
    make_batches = length_grouped_batches if args.group_by_length else random_batches
    batches = make_batches(data, args.micro_batch_size, args.seed)
    per_step = args.accumulation_steps(world_size) * world_size
    return itertools.islice(batches, start_step * per_step + rank, None, world_size)


def make_optimizer(fabric: L.Fabric, model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over what trains, with LIMA's betas, set up by Fabric."""
    optimizer = torch.optim.AdamW(param_groups(model, args.token_lr_scale), lr=args.learning_rate,
                                  weight_decay=args.weight_decay, betas=(0.9, 0.95))
    return fabric.setup_optimizers(optimizer)


@dataclass
class Session:
    """What every step of the loop works with."""

    fabric: L.Fabric
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_data: Mixture
    val_data: TokenDataset
    tokenizer: Tokenizer
    args: TrainArgs
    out: OutDir


def accumulate_gradients(s: Session, batches: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over one step's micro-batches (sample indices). Returns the summed losses and
    the supervised tokens of the step on all ranks ((1,), or (task, mix) with a mix), and the tokens
    this rank read (not the padding)."""
    fabric, model, train_data = s.fabric, s.model, s.train_data
    accumulation = len(batches)
    samples = [[train_data[i] for i in batch] for batch in batches]
    micro_batches = [collate(batch, s.tokenizer.eos_id) for batch in samples]
    # with a mix, which rows are mixed-in samples: their loss is summed apart from the task's
    mixed = [train_data.is_mix(batch) if train_data.mix is not None else None for batch in batches]
    # normalise by the supervised tokens of the whole step on all ranks, not per micro-batch, so
    # padding and masked turns weigh nothing; x world_size undoes DDP's averaging of gradients
    counts = torch.tensor([group_targets(y, m) for (_, y), m in zip(micro_batches, mixed)]).sum(0)
    counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum")  # (1,), or (task, mix)
    scale = fabric.world_size / counts.sum().clamp(min=1)
    step_sums = torch.zeros(len(counts), device=fabric.device)
    for i, ((input_ids, labels), m) in enumerate(zip(micro_batches, mixed)):
        input_ids, labels = fabric.to_device((input_ids, labels))
        targets = next_token_targets(labels)
        groups = None if m is None else fabric.to_device(m)[:, None].expand_as(targets).long()  # (B, T)
        with fabric.no_backward_sync(model, enabled=i < accumulation - 1):
            losses = summed_losses(fabric, model, input_ids, targets, groups, len(counts))  # (1,) or (task, mix)
            fabric.backward(losses.sum() * scale)
        step_sums += losses.detach()
    sums = fabric.all_reduce(step_sums, reduce_op="sum")
    real_tokens = sum(len(ids) for batch in samples for ids, _ in batch)
    return sums, counts, real_tokens


def mix_losses(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """The task's and the mix's loss per supervised token; a step may hold no sample of one of them:
    its column stays empty."""
    names = ("train_task_loss", "train_mix_loss")
    return {name: loss_sum / count for name, loss_sum, count in zip(names, sums.tolist(), counts.tolist()) if count}


def evaluate(s: Session, step: int, metrics: dict, bar: tqdm) -> dict:
    """Validate after `step` (from 0), record it in `metrics` and print it with a sample reply. Returns
    the validation losses."""
    val_loss, val_eot_loss = validate(s.fabric, s.model, s.val_data, s.args, s.tokenizer.eos_id, s.tokenizer.eot_id)
    metrics["val_loss"] = val_loss
    if val_eot_loss is not None:
        metrics["val_eot_loss"] = val_eot_loss
    with s.fabric.autocast():  # every rank decodes: under fsdp all must take part
        sample = sample_reply(s.model.module, s.val_data, s.tokenizer)
    if s.fabric.is_global_zero:
        at_eot = f" ({val_eot_loss:.4f} at end-of-turn tokens)" if val_eot_loss is not None else ""
        bar.write(f"step {step + 1}: val loss {val_loss:.4f}{at_eot}; sample {sample}")
    return {"val_loss": val_loss, "val_eot_loss": val_eot_loss}


def fit(s: Session, start_step: int = 0, skipped_steps: int = 0, stop: Optional[StopOnSignal] = None) -> dict:
    """Train from `start_step` to the last step. Returns the last train and validation losses, and the
    signal that stopped training early (after saving a checkpoint), if one did."""
    fabric, args = s.fabric, s.args
    accumulation = args.accumulation_steps(fabric.world_size)
    total_steps = args.total_steps(s.train_data.epoch_size)
    order = micro_batches_of_rank(s.train_data, args, fabric.world_size, fabric.global_rank, start_step)
    last = dict(NO_LOSSES)
    skipped_in_a_row = 0
    start_time = time.perf_counter()
    s.model.train()
    bar = tqdm(range(start_step, total_steps), desc="fine-tuning", unit="step", initial=start_step, total=total_steps,
               disable=not fabric.is_global_zero, dynamic_ncols=True)
    for step in bar:
        lr = lr_at_step(step, args, total_steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        step_start = time.perf_counter()
        sums, counts, real_tokens = accumulate_gradients(s, [next(order) for _ in range(accumulation)])
        train_loss = (sums.sum() / counts.sum().clamp(min=1)).item()
        if not math.isfinite(train_loss):
            raise stopped_on_nan("training loss", train_loss, step, s.out.state)
        _, skipped = optimizer_step(fabric, s.model, s.optimizer, args.grad_clip, step, s.out.state)
        skipped_steps += skipped
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row == MAX_SKIPPED_STEPS:
            raise BadValue(f"the gradients overflowed fp16 in {MAX_SKIPPED_STEPS} steps in a row, up to step "
                           f"{step + 1}: train with --precision bf16-mixed or 32-true, or lower --train.learning_rate")
        tokens_per_sec = real_tokens * fabric.world_size / (time.perf_counter() - step_start)
        last["train_loss"] = train_loss
        metrics = {"train_loss": train_loss, "learning_rate": lr, "tokens_per_sec": tokens_per_sec,
                   "skipped_steps": skipped_steps, "elapsed_sec": time.perf_counter() - start_time}
        if s.train_data.mix is not None:
            metrics.update(mix_losses(sums, counts))
        done = step + 1 == total_steps
        if (step + 1) % args.eval_interval == 0 or done:
            last.update(evaluate(s, step, metrics, bar))
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{metrics['val_loss']:.3f}" if "val_loss" in metrics else "-",
                        tok_s=f"{tokens_per_sec:.0f}", **({"skipped": skipped_steps} if skipped_steps else {}))
        fabric.log_dict(metrics, step=step + 1)
        stop_signal = stop.received(fabric) if stop else None
        if done or stop_signal or (args.save_interval and (step + 1) % args.save_interval == 0):
            s.out.save(fabric, s.model, s.optimizer, step + 1, skipped_steps)
        if stop_signal:
            last["stopped_by"] = stop_signal
            break
    bar.close()
    return last
