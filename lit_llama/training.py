"""The fine-tuning every finetune script shares: Fabric setup, the model prepared for the method
(LoRA, adapter or full), the training loop, checkpoints that resume exactly, and the out dir.

The loop: gradient accumulation (no gradient sync until the last micro-batch), loss per supervised
token of the whole step, linear warmup then a cosine or linear decay, fp16 steps that overflow
skipped, periodic validation (its loss at end-of-turn tokens apart) with one sample generation, a
progress bar, a metrics row per step and, at the end, a loss plot. The rooms beside it:
`batches.py` (what each step draws, a mixed-in split included), `precision.py` (what dtype trains),
`parallel.py` (ddp and fsdp), `metrics.py` (what a run records).
"""

import gc
import itertools
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from lit_llama.adapter import AdapterConfig, inject_adapter, is_adapter_name
from lit_llama.checkpoint import (CONFIG_FILE, HPARAMS_FILE, WEIGHTS_FILES, atomic_save, check_writable, load_model,
                                  read_hparams, write_json)
from lit_llama.batches import Mixture, collate, length_grouped_batches, random_batches
from lit_llama.data import IGNORE_INDEX, TokenDataset, load_mix, load_prepared
from lit_llama.errors import BadValue, MissingFile
from lit_llama.files import replace_durably, temporary_name
from lit_llama.generate import generate, stop_reason
from lit_llama.lora import LoRAConfig, inject_lora, is_lora_name
from lit_llama.metrics import LoggerName, make_loggers, plot_losses, truncate_metrics
from lit_llama.model import LLaMA
from lit_llama.parallel import (check_devices, device_type, full_state_dict, gather_objects, make_strategy,
                                rng_state, set_rng_state, trained_checksum)
from lit_llama.prompts import first_exchange
from lit_llama.precision import (TrainPrecision, compute_dtype, default_precision, grad_scaler, precision_plugin,
                                 set_training_dtypes)
from lit_llama.quantize import Quantize, nf4_tensor, quantize as quantize_base
from lit_llama.tokenizer import Tokenizer
from lit_llama.vocab import add_special_tokens, attach_token_rows, fold_token_rows

Method = Literal["lora", "adapter", "full"]
RESUME_FILE = "training_state.pth"
MAX_SKIPPED_STEPS = 50  # consecutive fp16 overflows before the run gives up


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


def check_token_lr_scale(token_lr_scale: float) -> None:
    if token_lr_scale < 0:
        raise BadValue(f"--train.token_lr_scale must be >= 0, got {token_lr_scale}")


def check_quantize(quantize: Optional[Quantize], processes: int) -> None:
    """A quantized base runs on one process."""
    if quantize is not None:
        if processes > 1:
            raise BadValue("--quantize nf4 runs on one device: pass --devices 1")
        nf4_tensor()  # the missing library named now, not after loading


def check_resumed_flags(out_dir: Path, resume: bool, flags: dict) -> None:
    """A resumed run keeps the flags that decide its base's form and its data order, as recorded in
    the out dir's hyperparameters (an out dir from before a flag existed recorded it as null)."""
    if not resume or not (Path(out_dir) / HPARAMS_FILE).is_file():
        return
    recorded = read_hparams(out_dir)
    for flag, value in flags.items():
        if recorded.get(flag) != value:
            raise BadValue(f"{out_dir} was trained with --{flag} {recorded.get(flag) or 'null'}: resume with the same flag")


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


def make_fabric(accelerator: str, devices: int, num_nodes: int, precision: TrainPrecision, strategy: str,
                logger_name: LoggerName, out_dir: Path) -> L.Fabric:
    plugin = precision_plugin(precision, device_type(accelerator))
    strategy = make_strategy(strategy, devices, num_nodes, compute_dtype(precision))
    loggers = make_loggers(logger_name, out_dir)
    try:
        return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, plugins=[plugin],
                        strategy=strategy, loggers=loggers)
    except ValueError as e:  # an accelerator name Lightning doesn't know; its message names the value, not the flag
        raise BadValue(f"--accelerator {accelerator}: {e}") from None


def prepare_model(model: LLaMA, method: Method, method_config: Union[LoRAConfig, AdapterConfig, None],
                  special_ids: list[int]) -> None:
    """Set `model` up for `method` and mark what trains. The special tokens' rows become parameters of
    their own (`model.token_rows`), to learn at their own rate. LoRA and adapter freeze the base and
    train their own parameters and those rows; full trains everything."""
    attach_token_rows(model, special_ids)
    if method == "full":  # the rows in wte and lm_head that token_rows stands for get no gradient
        return
    if method == "lora":
        inject_lora(model, method_config)
        trains = is_lora_name
    else:
        inject_adapter(model, method_config)
        trains = is_adapter_name
    for name, param in model.named_parameters():
        param.requires_grad = trains(name)


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
        losses = model(input_ids, targets=targets, loss_split=at_eot)  # summed: (elsewhere, at EOT)
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


class OutDir:
    """What a run writes: the trained weights (only what trained, except under full fine-tuning, where
    the out dir is a whole checkpoint dir), config, tokenizer, hyperparameters, metrics, and the
    training state that `--resume` continues from."""

    def __init__(self, path: Path, method: Method, trained: set[str], base_dtypes: dict[str, torch.dtype]) -> None:
        self.path = Path(path)
        self.trained = trained  # names in the state dict of what trains (and the special ids with it)
        self.is_checkpoint_dir = method == "full"  # its weights are a plain checkpoint, the rows folded in
        self.base_dtypes = base_dtypes  # a full fine-tune is written in its base's dtypes (fp32 is in the state)
        self.weights = self.path / WEIGHTS_FILES[method]
        self.state = self.path / RESUME_FILE
        self.metrics = self.path / "metrics.csv"

    def save(self, fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             skipped_steps: int) -> None:
        weights = full_state_dict(fabric, model, keep=lambda name: name in self.trained)  # on the CPU
        state = {"model": model, "optimizer": optimizer, "step": step, "skipped_steps": skipped_steps,
                 "rng": gather_objects(fabric, rng_state(fabric.device))}  # each rank's, for its own dropout draws
        scaler = grad_scaler(fabric.strategy.precision)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        tmp = temporary_name(self.state)
        fabric.save(tmp, state, filter={"model": lambda name, _: name in self.trained})
        if fabric.is_global_zero:
            # the weights first, the training state last: a kill in between leaves weights one step ahead
            # of the state, and --resume redoes that step to the same weights
            if self.is_checkpoint_dir:
                weights = {k: v.to(self.base_dtypes.get(k, v.dtype)) for k, v in fold_token_rows(weights).items()}
            atomic_save(weights, self.weights)
            replace_durably(tmp, self.state)
        fabric.barrier()

    def resume(self, fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Load the latest training state; returns the step it was saved at and the steps skipped so far."""
        if not self.state.is_file():
            raise MissingFile(f"--resume: {self.state} not found: the run in {self.path} stopped before its first "
                              f"checkpoint (or never ran there); run again without --resume to start from step 0")
        rest = fabric.load(self.state, {"model": model, "optimizer": optimizer}, strict=False, weights_only=True)
        if len(rest["rng"]) == fabric.world_size:
            set_rng_state(rest["rng"][fabric.global_rank], fabric.device)
        else:
            fabric.print(f"{self.state} was saved by {len(rest['rng'])} processes and resumes on {fabric.world_size}: "
                         "the data order is kept, but dropout draws differ from the uninterrupted run's")
        scaler = grad_scaler(fabric.strategy.precision)
        if scaler is not None and "scaler" in rest:
            scaler.load_state_dict(rest["scaler"])
        return rest["step"], rest["skipped_steps"]


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM (schedulers, `kill`) don't kill the run mid-step:
    the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self.previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum).name

    def received(self, fabric: L.Fabric) -> Optional[str]:
        """The signal name if any rank got one (every rank must stop at the same step)."""
        if fabric.world_size == 1:
            return self.signal
        anyone = fabric.all_reduce(torch.tensor(float(self.signal is not None), device=fabric.device), reduce_op="max")
        return (self.signal or "a signal on another rank") if anyone.item() else None


def stopped_on_nan(what: str, value: float, step: int, state: Path) -> BadValue:
    """The error that ends training when `what` is not finite at `step` (from 0), before the weights change."""
    return BadValue(f"the {what} is {value} at step {step + 1}; stopped before updating the weights. {state} keeps "
                    "the last good checkpoint: lower --train.learning_rate or check the data, then --resume true")


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


def fit(fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: Mixture,
        val_data: TokenDataset, tokenizer: Tokenizer, args: TrainArgs, out: OutDir, start_step: int = 0,
        skipped_steps: int = 0, stop: Optional[StopOnSignal] = None) -> dict:
    """Train from `start_step` to the last step. Returns the last train and validation losses, and the
    signal that stopped training early (after saving a checkpoint), if one did."""
    accumulation = args.accumulation_steps(fabric.world_size)
    total_steps = args.total_steps(train_data.epoch_size)
    mixing = train_data.mix is not None
    pad_id = tokenizer.eos_id
    order = micro_batches_of_rank(train_data, args, fabric.world_size, fabric.global_rank, start_step)
    last = {"train_loss": None, "val_loss": None, "val_eot_loss": None, "stopped_by": None}
    skipped_in_a_row = 0
    start_time = time.perf_counter()
    model.train()
    bar = tqdm(range(start_step, total_steps), desc="fine-tuning", unit="step", initial=start_step, total=total_steps,
               disable=not fabric.is_global_zero, dynamic_ncols=True)
    for step in bar:
        lr = lr_at_step(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        step_start = time.perf_counter()
        batches = [next(order) for _ in range(accumulation)]
        samples = [[train_data[i] for i in batch] for batch in batches]
        micro_batches = [collate(batch, pad_id) for batch in samples]
        # with a mix, which rows are mixed-in samples: their loss is summed apart from the task's
        mixed = [train_data.is_mix(batch) if mixing else None for batch in batches]
        # normalise by the supervised tokens of the whole step on all ranks, not per micro-batch, so
        # padding and masked turns weigh nothing; x world_size undoes DDP's averaging of gradients
        counts = torch.tensor([group_targets(y, m) for (_, y), m in zip(micro_batches, mixed)]).sum(0)
        counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum")  # (1,), or (task, mix)
        scale = fabric.world_size / counts.sum().clamp(min=1)
        step_sums = torch.zeros(len(counts), device=fabric.device)
        for i, ((input_ids, labels), m) in enumerate(zip(micro_batches, mixed)):
            input_ids, labels = fabric.to_device((input_ids, labels))
            targets = next_token_targets(labels)
            split = None if m is None else fabric.to_device(m)[:, None].expand_as(targets)  # (B, T)
            with fabric.no_backward_sync(model, enabled=i < accumulation - 1):
                losses = model(input_ids, targets=targets, loss_split=split)  # summed: (), or (task, mix)
                fabric.backward(losses.sum() * scale)
            step_sums += losses.detach()
        sums = fabric.all_reduce(step_sums, reduce_op="sum")
        train_loss = (sums.sum() / counts.sum().clamp(min=1)).item()
        if not math.isfinite(train_loss):
            raise stopped_on_nan("training loss", train_loss, step, out.state)
        _, skipped = optimizer_step(fabric, model, optimizer, args.grad_clip, step, out.state)
        skipped_steps += skipped
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row == MAX_SKIPPED_STEPS:
            raise BadValue(f"the gradients overflowed fp16 in {MAX_SKIPPED_STEPS} steps in a row, up to step "
                           f"{step + 1}: train with --precision bf16-mixed or 32-true, or lower --train.learning_rate")
        real_tokens = sum(len(ids) for batch in samples for ids, _ in batch)  # not the padding
        tokens_per_sec = real_tokens * fabric.world_size / (time.perf_counter() - step_start)
        last["train_loss"] = train_loss
        metrics = {"train_loss": train_loss, "learning_rate": lr, "tokens_per_sec": tokens_per_sec,
                   "skipped_steps": skipped_steps, "elapsed_sec": time.perf_counter() - start_time}
        if mixing:  # a step may hold no sample of one of them: its column stays empty
            for name, loss_sum, count in zip(("train_task_loss", "train_mix_loss"), sums.tolist(), counts.tolist()):
                if count:
                    metrics[name] = loss_sum / count
        done = step + 1 == total_steps
        if (step + 1) % args.eval_interval == 0 or done:
            val_loss, val_eot_loss = validate(fabric, model, val_data, args, pad_id, tokenizer.eot_id)
            last["val_loss"] = metrics["val_loss"] = val_loss
            last["val_eot_loss"] = val_eot_loss
            if val_eot_loss is not None:
                metrics["val_eot_loss"] = val_eot_loss
            sample = sample_reply(model, val_data, tokenizer)  # every rank decodes: under fsdp all must take part
            if fabric.is_global_zero:
                at_eot = f" ({val_eot_loss:.4f} at end-of-turn tokens)" if val_eot_loss is not None else ""
                bar.write(f"step {step + 1}: val loss {val_loss:.4f}{at_eot}; sample {sample}")
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{metrics['val_loss']:.3f}" if "val_loss" in metrics else "-",
                        tok_s=f"{tokens_per_sec:.0f}", **({"skipped": skipped_steps} if skipped_steps else {}))
        fabric.log_dict(metrics, step=step + 1)
        stop_signal = stop.received(fabric) if stop else None
        if done or stop_signal or (args.save_interval and (step + 1) % args.save_interval == 0):
            out.save(fabric, model, optimizer, step + 1, skipped_steps)
        if stop_signal:
            last["stopped_by"] = stop_signal
            break
    bar.close()
    return last


def finetune(method: Method, method_config: Union[LoRAConfig, AdapterConfig, None], data_dir: Path,
             checkpoint_dir: Path, out_dir: Path, accelerator: str, devices: int, num_nodes: int,
             precision: Optional[TrainPrecision], strategy: str, activation_checkpointing: bool, token_init: str,
             resume: bool, logger_name: LoggerName, train: TrainArgs, quantize: Optional[Quantize] = None,
             mix_dir: Optional[Path] = None, mix_ratio: float = 1.0) -> dict:
    """Everything a finetune script does after parsing its flags. Returns the last losses."""
    check_token_lr_scale(train.token_lr_scale)
    check_quantize(quantize, devices * num_nodes)
    mixing = mix_dir is not None
    # as hyperparameters.json records them, and a resumed run must repeat them
    mix_flags = {"mix_dir": str(Path(mix_dir).resolve()) if mixing else None, "mix_ratio": mix_ratio if mixing else None}
    check_resumed_flags(out_dir, resume, {"quantize": quantize, **mix_flags})
    tokenizer, task_data, val_data = load_prepared(data_dir, checkpoint_dir)  # bad paths fail before any launch
    if mixing and mix_ratio <= 0:
        raise BadValue(f"--mix_ratio must be > 0, got {mix_ratio}")
    train_data = Mixture(task_data, load_mix(mix_dir, data_dir, tokenizer) if mixing else None, mix_ratio)
    check_devices(accelerator, devices)
    precision = precision or default_precision()
    fabric = make_fabric(accelerator, devices, num_nodes, precision, strategy, logger_name, out_dir)
    fabric.launch()
    try:
        return train_on_this_rank(fabric, method, method_config, tokenizer, train_data, val_data, checkpoint_dir,
                                  data_dir, out_dir, precision, activation_checkpointing, token_init, resume, train,
                                  quantize, mix_flags)
    finally:
        # with several processes, the process group's threads must stop before the interpreter does, or
        # C++ may abort the exit ("terminate called without an active exception"); sharded modules and
        # fsdp's device mesh hold the group too, so they go first
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            del fabric
            gc.collect()
            torch.distributed.destroy_process_group()


def train_on_this_rank(fabric: L.Fabric, method: Method, method_config: Union[LoRAConfig, AdapterConfig, None],
                       tokenizer: Tokenizer, train_data: Mixture, val_data: TokenDataset, checkpoint_dir: Path,
                       data_dir: Path, out_dir: Path, precision: TrainPrecision, activation_checkpointing: bool,
                       token_init: str, resume: bool, train: TrainArgs, quantize: Optional[Quantize] = None,
                       mix_flags: Optional[dict] = None) -> dict:
    """`finetune` once the processes are launched: load, train and save, on every rank."""
    fabric.seed_everything(train.seed)
    train.accumulation_steps(fabric.world_size)  # a bad batch size fails now, not after loading
    model = load_model(checkpoint_dir)
    base_dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    learned = Tokenizer.from_dir(checkpoint_dir).special_tokens.values()  # a second round keeps them
    special_ids = add_special_tokens(model, tokenizer, token_init, seed=train.seed, learned=learned)
    prepare_model(model, method, method_config, special_ids)
    set_training_dtypes(model, precision)
    quantize_base(model, quantize, fabric.device)  # after the dtypes: moving an NF4 weight to a dtype dequantizes it
    model.activation_checkpointing = activation_checkpointing
    model.set_residual_dropout(train.residual_dropout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if model.token_rows is not None:
        trained.add("token_rows.ids")
    out = OutDir(out_dir, method, trained, base_dtypes)
    if fabric.is_global_zero:
        # weights, AdamW's two states, and a new state file written beside the old one
        trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
        check_writable(out.path, need_bytes=7 * trained_bytes)
    fabric.print(f"{method}: training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
                 f"parameters ({len(special_ids)} special-token rows) in {precision}"
                 f"{', on an nf4 base' if quantize else ''}; "
                 f"{len(train_data.task)} train / {len(val_data)} val samples"
                 + (f", {train_data.mix_per_epoch} of {len(train_data.mix)} mixed-in samples per epoch"
                    if train_data.mix is not None else ""))
    model = fabric.setup_module(model)
    optimizer = torch.optim.AdamW(param_groups(model, train.token_lr_scale), lr=train.learning_rate,
                                  weight_decay=train.weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    start_step = skipped_steps = 0
    if resume:
        start_step, skipped_steps = out.resume(fabric, model, optimizer)
        total_steps = train.total_steps(train_data.epoch_size)
        if start_step >= total_steps:  # killed after its last checkpoint: only the loss plot may be missing
            if fabric.is_global_zero and out.metrics.is_file():
                plot_losses(out.metrics, out.path / "loss.png")
            fabric.print(f"{out.state} is at step {start_step} of {total_steps}: the run is finished, nothing left to train")
            return {"train_loss": None, "val_loss": None, "val_eot_loss": None, "stopped_by": None}
        fabric.print(f"resuming from step {start_step} of {out.state}")
        if fabric.is_global_zero:
            truncate_metrics(out.metrics, start_step)
    elif fabric.is_global_zero and out.metrics.is_file():
        out.metrics.unlink()  # a fresh run: no rows from an older one

    if fabric.is_global_zero:  # what a later load needs, written before hours of training
        model.config.save(out.path / CONFIG_FILE)
        tokenizer.save(out.path)
        hparams = {"method": method, "checkpoint_dir": Path(checkpoint_dir).resolve(), "data_dir": Path(data_dir).resolve(),
                   "precision": precision, "quantize": quantize, "token_init": token_init, "train": asdict(train),
                   **(mix_flags or {})}
        if method_config is not None:
            hparams[method] = asdict(method_config)
        write_json(hparams, out.path / HPARAMS_FILE)
    with StopOnSignal() as stop:
        losses = fit(fabric, model, optimizer, train_data, val_data, tokenizer, train, out, start_step, skipped_steps,
                     stop)
    if losses["stopped_by"]:
        fabric.print(f"{losses['stopped_by']}: saved a checkpoint in {out.path} and stopped; continue with --resume true")
        raise SystemExit(130)

    if fabric.world_size > 1:  # the ranks must hold the same weights; cheap to check, costly to miss
        sums = torch.tensor(gather_objects(fabric, trained_checksum(model).item()), dtype=torch.float64)
        fabric.print(f"trained weights agree across {fabric.world_size} ranks: {bool(torch.allclose(sums, sums[0]))}")
    if fabric.is_global_zero:
        plot_losses(out.metrics, out.path / "loss.png")
        fabric.print(f"loss plot: {out.path / 'loss.png'}")
        fabric.print(f"final train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}; saved to {out.path}")
    fabric.barrier()  # the ranks close their process group together, not one while the other still writes
    return losses
