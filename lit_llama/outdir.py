"""A fine-tune's out dir: the trained weights, what a later load needs (config, tokenizer,
hyperparameters), metrics, and the training state that `--resume` continues from, each written so
that a kill at any moment leaves the last complete checkpoint. And how a run stops early and still
resumes: on a signal, at the end of a step after a checkpoint; on a loss or gradient norm that is not
finite, before the weights change."""

import shutil
import signal
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from lit_llama.checkpoint import CONFIG_FILE, HPARAMS_FILE, MODEL_FILE, drop_block_weights, read_hparams
from lit_llama.errors import BadValue, MissingFile
from lit_llama.files import atomic_save, replace_durably, temporary_name, write_json
from lit_llama.methods import method_of
from lit_llama.model import LLaMAConfig
from lit_llama.parallel import full_state_dict, gather_objects, is_sharded, rng_state, set_rng_state
from lit_llama.precision import grad_scaler
from lit_llama.sharded import LATEST, latest_state, load_state, publish_state, save_by_block, save_state
from lit_llama.tokenizer import Tokenizer
from lit_llama.vocab import fold_token_rows

RESUME_FILE = "training_state.pth"
RESUME_DIR = "training_state"


def check_resumed_flags(out_dir: Path, resume: bool, flags: dict) -> None:
    """A resumed run keeps the flags that decide its base's form and its data order, as recorded in
    the out dir's hyperparameters (an out dir from before a flag existed recorded it as null)."""
    if not resume or not (Path(out_dir) / HPARAMS_FILE).is_file():
        return
    recorded = read_hparams(out_dir)
    for flag, value in flags.items():
        if recorded.get(flag) != value:
            raise BadValue(f"{out_dir} was trained with --{flag} {recorded.get(flag) or 'null'}: resume with the same flag")


class OutDir:
    """What a run writes: the trained weights (only what trained, except under full fine-tuning, where
    the out dir is a whole checkpoint dir), config, tokenizer, hyperparameters, metrics, and the
    training state that `--resume` continues from."""

    def __init__(self, path: Path, method: str, trained: set[str], base_dtypes: dict[str, torch.dtype]) -> None:
        spec = method_of(method)
        self.path = Path(path)
        self.trained = trained  # names in the state dict of what trains (and the special ids with it)
        self.is_checkpoint_dir = spec.whole  # its weights are a plain checkpoint, the rows folded in
        self.base_dtypes = base_dtypes  # a full fine-tune is written in its base's dtypes (fp32 is in the state)
        self.weights = self.path / (spec.weights_file or MODEL_FILE)
        self.state = self.path / RESUME_FILE  # one file, from rank 0
        self.state_dir = self.path / RESUME_DIR  # under fsdp: every rank's shards (sharded.py)
        self.metrics = self.path / "metrics.csv"

    def describe(self, config: LLaMAConfig, tokenizer: Tokenizer, hparams: dict) -> None:
        """Write what a later load needs besides the weights: the model config, the tokenizer files and
        hyperparameters.json."""
        config.save(self.path / CONFIG_FILE)
        tokenizer.save(self.path)
        write_json(hparams, self.path / HPARAMS_FILE)

    def save(self, fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             skipped_steps: int) -> None:
        """Write the trained weights and the training state at `step`. Every rank must call it: under fsdp
        each writes its own shards of the state and takes part in writing the weights (sharded.py);
        elsewhere rank 0 writes one file of each."""
        sharded = is_sharded(fabric)
        rest = {"step": step, "skipped_steps": skipped_steps,
                "rng": gather_objects(fabric, rng_state(fabric.device))}  # each rank's, for its own dropout draws
        scaler = grad_scaler(fabric.strategy.precision)
        if scaler is not None:
            rest["scaler"] = scaler.state_dict()
        if sharded:
            staged = save_state(model.module, optimizer.optimizer, self.state_dir, step, self.trained.__contains__, rest)
        else:
            staged = temporary_name(self.state)
            fabric.save(staged, {"model": model, "optimizer": optimizer, **rest},
                        filter={"model": lambda name, _: name in self.trained})
        # the weights first, the training state last: a kill in between leaves weights one step ahead of
        # the state, and --resume redoes that step to the same weights
        if sharded and self.is_checkpoint_dir:
            save_by_block(fabric, model, self.path, step, self.as_checkpoint)
        else:
            weights = full_state_dict(fabric, model, keep=lambda name: name in self.trained)  # on the CPU of rank 0
            if fabric.is_global_zero:
                atomic_save(self.as_checkpoint(weights) if self.is_checkpoint_dir else weights, self.weights)
                if self.is_checkpoint_dir:
                    drop_block_weights(self.path)  # an earlier save's, under fsdp
        if fabric.is_global_zero:
            if sharded:
                publish_state(self.state_dir, staged, fabric.world_size)
                self.state.unlink(missing_ok=True)  # an earlier save's, without fsdp
            else:
                replace_durably(staged, self.state)
                if self.state_dir.exists():
                    shutil.rmtree(self.state_dir)
        fabric.barrier()

    def as_checkpoint(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole-model weights as a plain checkpoint holds them: the special tokens' rows folded into the
        embedding and head, and every tensor in its base's dtype (the fp32 masters are in the state)."""
        if "token_rows.ids" in weights:
            weights = fold_token_rows(weights)
        return {name: t.to(self.base_dtypes.get(name, t.dtype)) for name, t in weights.items()}

    def resume(self, fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Load the latest training state, whichever strategy wrote it; returns the step it was saved at and
        the steps skipped so far."""
        sharded = latest_state(self.state_dir)
        if sharded is not None and self.state.is_file():  # a kill between two saves' last steps: the newer
            sharded = sharded if (self.state_dir / LATEST).stat().st_mtime >= self.state.stat().st_mtime else None
        if sharded is None and not self.state.is_file():
            raise MissingFile(f"--resume: {self.state} not found: the run in {self.path} stopped before its first "
                              f"checkpoint (or never ran there); run again without --resume to start from step 0")
        if sharded is not None:
            rest = load_state(model.module, optimizer.optimizer, sharded, self.trained.__contains__)
        else:
            rest = fabric.load(self.state, {"model": model, "optimizer": optimizer}, strict=False, weights_only=True)
        saved_by = len(rest["rng"])
        if saved_by == fabric.world_size:
            set_rng_state(rest["rng"][fabric.global_rank], fabric.device)
        else:
            fabric.print(f"{self.path}'s training state was saved by {saved_by} processes and resumes on "
                         f"{fabric.world_size}: the data order is kept, but dropout draws differ from the "
                         "uninterrupted run's")
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
