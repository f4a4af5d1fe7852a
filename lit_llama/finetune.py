"""What every finetune script does after parsing its flags: check them, load the data, launch Fabric,
make the base model ready for its method (LoRA, adapter or full), resume or start the out dir, run the
loop of `training.py`, and finish (the loss plot). The flags all three scripts share are two groups:
`DataArgs` (what trains on what) and `RunLayout` (where it runs, and its out dir)."""

import gc
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from lit_llama.batches import Mixture
from lit_llama.checkpoint import CONFIG_FILE, MAKE_CHECKPOINT, load_model, read_config
from lit_llama.cli import FlagGroup
from lit_llama.dataset import TokenDataset, load_mix, load_prepared
from lit_llama.errors import BadValue
from lit_llama.files import check_writable, require_file
from lit_llama.memory import Setup, plan, table
from lit_llama.methods import Method, MethodConfig, prepare_model
from lit_llama.metrics import LoggerName, make_loggers, plot_losses, truncate_metrics
from lit_llama.model import LLaMA
from lit_llama.outdir import OutDir, StopOnSignal, check_resumed_flags
from lit_llama.parallel import check_devices, device_type, gather_objects, is_sharded, make_strategy, trained_checksum
from lit_llama.precision import TrainPrecision, compute_dtype, default_precision, precision_plugin, set_training_dtypes
from lit_llama.quantize import Quantize, nf4_tensor, quantize as quantize_base
from lit_llama.sharded import shard_and_load
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import NO_LOSSES, Session, TrainArgs, fit, make_optimizer
from lit_llama.vocab import add_special_tokens


@dataclass
class DataArgs(FlagGroup):
    """What trains on what.

    Args:
        data_dir: prepared data: train.pt, val.pt and the tokenizer with the end-of-turn token
        mix_dir: a second prepared data dir (such as scripts/self_sample.py's cache, prepared), prepared with
            the same tokenizer, whose train split is mixed into training; validation stays on data_dir's
        mix_ratio: samples of mix_dir per task sample in each epoch (DELIA mixed in 100 to 260)
        checkpoint_dir: the base model: lit_model.pth, model_config.json, tokenizer.model
        token_init: how the special tokens' embedding and head rows start: mean, mean_noise, normal,
            copy:<piece> or describe:<text> (see howto/special_tokens.md)
    """

    data_dir: Path
    mix_dir: Optional[Path] = None
    mix_ratio: float = 1.0
    checkpoint_dir: Path = Path("checkpoints/tiny")
    token_init: str = "mean"

    def mix_flags(self) -> dict:
        """--mix_dir and --mix_ratio as hyperparameters.json records them (null without a mix), and a
        resumed run must repeat them."""
        mixing = self.mix_dir is not None
        return {"mix_dir": str(Path(self.mix_dir).resolve()) if mixing else None,
                "mix_ratio": self.mix_ratio if mixing else None}


@dataclass
class RunLayout(FlagGroup):
    """Where the run runs, and its out dir.

    Args:
        out_dir: where the trained weights and everything needed to load them are written
        accelerator: cpu, cuda, ... or auto
        devices: devices per node
        num_nodes: machines taking part
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true (default: bf16-true on a GPU that computes bf16
            natively, else 32-true); what trains is kept in fp32 under all of them (howto/finetune_lora.md, "Precision")
        strategy: auto, ddp, or fsdp (FSDP2: weights, gradients and optimizer state sharded per transformer block)
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them: less memory, about a third more compute
        resume: continue from the training state saved in out_dir
        logger_name: csv (out_dir/metrics.csv, always written), or also tensorboard or wandb (files under out_dir)
        plan: print the memory plan of these settings (scripts/plan_memory.py's, with the data's longest
            sample) and exit, loading nothing
    """

    out_dir: Path = Path("out")
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: Optional[TrainPrecision] = None
    strategy: str = "auto"
    activation_checkpointing: bool = False
    resume: bool = False
    logger_name: LoggerName = "csv"
    plan: bool = False


@dataclass
class FineTuneRun:
    """Every setting of a fine-tune: the method and its settings, the two flag groups, the optimisation
    settings and the base's form."""

    method: Method
    data: DataArgs
    layout: RunLayout
    train: TrainArgs = field(default_factory=TrainArgs)
    method_config: MethodConfig = None
    quantize: Optional[Quantize] = None

    def hparams(self) -> dict:
        """What hyperparameters.json records (the precision resolved)."""
        data = self.data
        hparams = {"method": self.method, "checkpoint_dir": Path(data.checkpoint_dir).resolve(),
                   "data_dir": Path(data.data_dir).resolve(), "precision": self.layout.precision,
                   "quantize": self.quantize, "token_init": data.token_init, "train": asdict(self.train),
                   **data.mix_flags()}
        if self.method_config is not None:
            hparams[self.method] = asdict(self.method_config)
        return hparams


def check_token_lr_scale(token_lr_scale: float) -> None:
    if token_lr_scale < 0:
        raise BadValue(f"--train.token_lr_scale must be >= 0, got {token_lr_scale}")


def check_quantize(quantize: Optional[Quantize], processes: int, strategy: str) -> None:
    """A quantized base runs on one process, or sharded on several (FSDP2 gathers the NF4 codes)."""
    if quantize is not None:
        if processes > 1 and strategy != "fsdp":
            raise BadValue(f"--quantize nf4 on {processes} processes needs --strategy fsdp (the 4-bit base is "
                           "sharded; ddp would replicate it)")
        if processes == 1 and strategy == "fsdp":  # FSDP2 can't gather NF4 codes over a mesh of one
            raise BadValue("--quantize nf4 with --strategy fsdp needs 2 or more processes; on one, leave out "
                           "--strategy fsdp")
        nf4_tensor()  # the missing library named now, not after loading


def load_data(data: DataArgs) -> tuple[Tokenizer, Mixture, TokenDataset]:
    """The tokenizer, what training draws from (the task's train split and any mix) and the validation split."""
    tokenizer, task_data, val_data = load_prepared(data.data_dir, data.checkpoint_dir)
    mixing = data.mix_dir is not None
    if mixing and data.mix_ratio <= 0:
        raise BadValue(f"--mix_ratio must be > 0, got {data.mix_ratio}")
    mix = load_mix(data.mix_dir, data.data_dir, tokenizer) if mixing else None
    return tokenizer, Mixture(task_data, mix, data.mix_ratio), val_data


def make_fabric(layout: RunLayout) -> L.Fabric:
    """Fabric for `layout`, whose precision is resolved (not None)."""
    plugin = precision_plugin(layout.precision, device_type(layout.accelerator))
    strategy = make_strategy(layout.strategy, layout.devices, layout.num_nodes, compute_dtype(layout.precision))
    loggers = make_loggers(layout.logger_name, layout.out_dir)
    try:
        return L.Fabric(accelerator=layout.accelerator, devices=layout.devices, num_nodes=layout.num_nodes,
                        plugins=[plugin], strategy=strategy, loggers=loggers)
    except ValueError as e:  # an accelerator name Lightning doesn't know; its message names the value, not the flag
        raise BadValue(f"--accelerator {layout.accelerator}: {e}") from None


def memory_plan(run: FineTuneRun) -> str:
    """The memory plan of `run` (lit_llama/memory.py), read from the checkpoint's config and the data dir's
    prepare.json (its longest sample, its special tokens): no weights and no samples are loaded."""
    data = run.data
    config = read_config(Path(data.checkpoint_dir) / CONFIG_FILE, "is this a checkpoint dir? " + MAKE_CHECKPOINT)
    prepared = json.loads(require_file(Path(data.data_dir) / "prepare.json", "is this a prepared data dir?").read_text())
    method = "qlora" if run.quantize else run.method
    configs = {} if run.method_config is None else {run.method: run.method_config}
    setup = Setup(config, method=method, precision=run.layout.precision or default_precision(),
                  strategy=run.layout.strategy, processes=run.layout.devices * run.layout.num_nodes,
                  micro_batch_size=run.train.micro_batch_size, max_seq_length=prepared["report"]["longest"],
                  activation_checkpointing=run.layout.activation_checkpointing,
                  special_tokens=len(prepared["special_tokens"]), device_type=device_type(run.layout.accelerator),
                  **configs)
    return table(plan(setup))


def finetune(run: FineTuneRun) -> dict:
    """Everything a finetune script does after parsing its flags. Returns the last losses."""
    layout = run.layout
    if layout.plan:
        print(memory_plan(run))
        return dict(NO_LOSSES)
    check_token_lr_scale(run.train.token_lr_scale)
    check_quantize(run.quantize, layout.devices * layout.num_nodes, layout.strategy)
    check_resumed_flags(layout.out_dir, layout.resume, {"quantize": run.quantize, **run.data.mix_flags()})
    tokenizer, train_data, val_data = load_data(run.data)  # bad paths fail before any launch
    check_devices(layout.accelerator, layout.devices)
    run = replace(run, layout=replace(layout, precision=layout.precision or default_precision()))
    fabric = make_fabric(run.layout)
    fabric.launch()
    try:
        return train_on_this_rank(fabric, run, tokenizer, train_data, val_data)
    finally:
        # with several processes, the process group's threads must stop before the interpreter does, or
        # C++ may abort the exit ("terminate called without an active exception"); sharded modules and
        # fsdp's device mesh hold the group too, so they go first
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            del fabric
            gc.collect()
            torch.distributed.destroy_process_group()


def train_on_this_rank(fabric: L.Fabric, run: FineTuneRun, tokenizer: Tokenizer, train_data: Mixture,
                       val_data: TokenDataset) -> dict:
    """`finetune` once the processes are launched: load, train and save, on every rank."""
    fabric.seed_everything(run.train.seed)
    run.train.accumulation_steps(fabric.world_size)  # a bad batch size fails now, not after loading
    model, out = model_to_train(fabric, run, tokenizer)
    announce(fabric, run, model, out, train_data=train_data, n_val=len(val_data))
    model = fabric.setup_module(model)
    model.mark_forward_method("hidden")  # the loss calls it: through the DDP wrapper, as forward
    optimizer = make_optimizer(fabric, model, run.train)
    total_steps = run.train.total_steps(train_data.epoch_size)
    start = start_or_resume(fabric, out, model, optimizer, resume=run.layout.resume, total_steps=total_steps)
    if start is None:
        return dict(NO_LOSSES)
    if fabric.is_global_zero:  # what a later load needs, written before hours of training
        out.describe(model.config, tokenizer, run.hparams())
    session = Session(fabric=fabric, model=model, optimizer=optimizer, train_data=train_data, val_data=val_data,
                      tokenizer=tokenizer, args=run.train, out=out)
    with StopOnSignal() as stop:
        losses = fit(session, *start, stop)
    finish(fabric, model, out, losses)
    return losses


def model_to_train(fabric: L.Fabric, run: FineTuneRun, tokenizer: Tokenizer) -> tuple[LLaMA, OutDir]:
    """The base model fitted to the tokenizer's special tokens, set up for the method, in its training
    dtypes (and quantized, if asked), and the out dir that saves what trains."""
    checkpoint_dir = run.data.checkpoint_dir
    model = load_model(checkpoint_dir)
    shard = is_sharded(fabric)
    if shard:  # each rank loads only its own shards of the blocks, once the model is sharded (sharded.py)
        model.transformer.h.to("meta")
    base_dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    learned = Tokenizer.from_dir(checkpoint_dir).special_tokens.values()  # a second round keeps them
    special_ids = add_special_tokens(model, tokenizer, run.data.token_init, seed=run.train.seed, learned=learned)
    prepare_model(model, run.method, run.method_config, special_ids)
    set_training_dtypes(model, run.layout.precision)
    # quantized after the dtypes are set (moving an NF4 weight to a dtype dequantizes it); under fsdp
    # block by block, each as it is sharded
    if shard:
        model = shard_and_load(model, fabric.strategy.device_mesh, checkpoint_dir, fabric.device,
                               compute_dtype(run.layout.precision), run.quantize)
    else:
        quantize_base(model, run.quantize, fabric.device)
    model.activation_checkpointing = run.layout.activation_checkpointing
    model.set_residual_dropout(run.train.residual_dropout)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if model.token_rows is not None:
        trained.add("token_rows.ids")
    return model, OutDir(run.layout.out_dir, run.method, trained, base_dtypes)


def announce(fabric: L.Fabric, run: FineTuneRun, model: LLaMA, out: OutDir, *, train_data: Mixture, n_val: int) -> None:
    """Check that the out dir has room for checkpoints, and say what trains on what."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if fabric.is_global_zero:
        # weights, AdamW's two states, and a new state file written beside the old one
        trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
        check_writable(out.path, need_bytes=7 * trained_bytes)
    n_rows = 0 if model.token_rows is None else len(model.token_rows.ids)
    fabric.print(f"{run.method}: training {sum(p.numel() for p in trainable):,} of "
                 f"{sum(p.numel() for p in model.parameters()):,} parameters ({n_rows} special-token rows) in "
                 f"{run.layout.precision}{', on an nf4 base' if run.quantize else ''}; "
                 f"{len(train_data.task)} train / {n_val} val samples"
                 + (f", {train_data.mix_per_epoch} of {len(train_data.mix)} mixed-in samples per epoch"
                    if train_data.mix is not None else ""))


def start_or_resume(fabric: L.Fabric, out: OutDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    resume: bool, total_steps: int) -> Optional[tuple[int, int]]:
    """The step to start at and the steps skipped so far: (0, 0) for a fresh run (the out dir's metrics
    cleared), the saved state's with `resume`, or None if that state is already at the last step."""
    if not resume:
        if fabric.is_global_zero and out.metrics.is_file():
            out.metrics.unlink()  # a fresh run: no rows from an older one
        return 0, 0
    step, skipped_steps = out.resume(fabric, model, optimizer)
    if step >= total_steps:  # killed after its last checkpoint: only the loss plot may be missing
        if fabric.is_global_zero and out.metrics.is_file():
            plot_losses(out.metrics, out.path / "loss.png")
        fabric.print(f"{out.state} is at step {step} of {total_steps}: the run is finished, nothing left to train")
        return None
    fabric.print(f"resuming from step {step} of {out.state}")
    if fabric.is_global_zero:
        truncate_metrics(out.metrics, step)
    return step, skipped_steps


def finish(fabric: L.Fabric, model: torch.nn.Module, out: OutDir, losses: dict) -> None:
    """After the loop: stop with exit code 130 if a signal stopped it, else check that the ranks agree,
    draw the loss plot and report."""
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
