"""Checkpoint dirs: what they hold, how to load them lean, how to write a plain one.

A base checkpoint dir:   lit_model.pth, model_config.json, tokenizer.model [, special_tokens.json]
                         (a full fine-tune under fsdp writes its weights a block at a time instead:
                         lit_model.safetensors.index.json and one lit_model-*.safetensors per block)
A fine-tune out dir:     model_config.json, tokenizer.model, special_tokens.json, hyperparameters.json
                         (method, base checkpoint dir, method settings, training settings), metrics.csv,
                         training_state.pth (under fsdp training_state/, for --resume), and the trained weights:
                           lora     lit_model_lora.pth     LoRA matrices + special-token rows
                           adapter  lit_model_adapter.pth  adapter prompts and gates + special-token rows
                           full     lit_model.pth          everything: the out dir is a checkpoint dir
"""

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Collection, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lit_llama.errors import BadValue, MissingFile, file_error
from lit_llama.files import atomic_save, require_dir, require_file
from lit_llama.lora import merge_lora
from lit_llama.methods import method_of
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.precision import frozen_dtype
from lit_llama.quantize import round_trip
from lit_llama.tokenizer import Tokenizer
from lit_llama.vocab import attach_token_rows, grow_vocab, merge_token_rows

MODEL_FILE = "lit_model.pth"
WEIGHTS_INDEX = "lit_model.safetensors.index.json"  # {"weight_map": {name: file}}, the files beside it
CONFIG_FILE = "model_config.json"
HPARAMS_FILE = "hyperparameters.json"
MAKE_CHECKPOINT = "make a checkpoint dir with scripts/prepare_tiny.py or scripts/convert_hf_checkpoint.py"
GIVE_OUT_DIR = "give the out dir that finetune/lora.py or finetune/adapter.py wrote"


def read_config(path: Path, what: str) -> LLaMAConfig:
    """The model config in `path`; a missing, damaged or foreign file is named in one line."""
    require_file(path, what)
    try:
        return LLaMAConfig.from_json(path)
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(path)) from None
    except (ValueError, TypeError) as e:  # bad JSON, or fields that are not LLaMAConfig's
        raise BadValue(f"{path} is not a model config of this repo ({str(e).splitlines()[0]}); write it again "
                       f"with the script that made the dir") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only, memory-mapped and on the CPU (a file written from GPU tensors loads on a machine
    without that GPU; the caller moves them where they run): nothing is read until it is used. A file
    that holds code (a pickle that would run something when loaded) is refused, and a truncated or
    corrupted one is named."""
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(path)) from None
    except pickle.UnpicklingError:
        raise BadValue(f"{path} holds more than tensors and was not loaded (it could run code); only load "
                       f"checkpoints you trust, converted with this project's scripts") from None
    except (RuntimeError, EOFError) as e:
        raise BadValue(f"{path} is truncated or corrupted ({str(e).split('.')[0]}); "
                       f"write it again, or use the previous checkpoint") from None


def weights_file(checkpoint_dir: Path) -> Path:
    """The file that says what a checkpoint dir's weights are: lit_model.pth, or the index of the weights
    written a block at a time; the one written last if a kill left both."""
    checkpoint_dir = Path(checkpoint_dir)
    found = [path for path in (checkpoint_dir / MODEL_FILE, checkpoint_dir / WEIGHTS_INDEX) if path.is_file()]
    if not found:
        raise MissingFile(f"{checkpoint_dir / MODEL_FILE} not found: the checkpoint dir has no weights")
    return max(found, key=lambda path: path.stat().st_mtime)


def read_weights(checkpoint_dir: Path, names: Optional[Collection[str]] = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint dir on the CPU (those of `names`, or all): lit_model.pth memory-mapped
    (read when used), or read from the files of lit_model.safetensors.index.json that hold them."""
    path = weights_file(checkpoint_dir)
    if path.name == MODEL_FILE:
        state = load_state_dict(path)
        return state if names is None else {name: state[name] for name in names}
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        files = sorted(set(weight_map.values() if names is None else (weight_map[name] for name in names)))
        state = {name: t for file in files for name, t in load_file(path.parent / file).items()}
        return state if names is None else {name: state[name] for name in names}
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
        raise BadValue(f"{path} or a file it names is missing or damaged ({e!r}); write the checkpoint again, "
                       f"or use the previous one") from None


def drop_block_weights(checkpoint_dir: Path) -> None:
    """Remove weights written a block at a time (once lit_model.pth holds newer ones)."""
    (Path(checkpoint_dir) / WEIGHTS_INDEX).unlink(missing_ok=True)
    for path in Path(checkpoint_dir).glob("lit_model-*.safetensors"):
        path.unlink()


def load_model(checkpoint_dir: Path, dtype: Optional[torch.dtype] = None) -> LLaMA:
    """The model of a checkpoint dir, built on the meta device and given the mmapped tensors as its
    parameters (no random init, no second copy). Stays on the CPU; move it where it should run."""
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", MAKE_CHECKPOINT)
    config = read_config(checkpoint_dir / CONFIG_FILE, "is this a checkpoint dir? " + MAKE_CHECKPOINT)
    with torch.device("meta"):
        model = LLaMA(config)
    model.load_state_dict(read_weights(checkpoint_dir), assign=True)
    if dtype is not None:
        model.to(dtype)
    return model


def save_checkpoint_dir(model: LLaMA, tokenizer: Tokenizer, directory: Path) -> None:
    """Write a plain (base-shaped) checkpoint dir that every script loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), directory / MODEL_FILE)
    model.config.save(directory / CONFIG_FILE)
    tokenizer.save(directory)


def read_hparams(out_dir: Path) -> dict:
    """The hyperparameters.json of a finetune/*.py out dir; "method" says which script wrote it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MissingFile(f"{out_dir} not found: {GIVE_OUT_DIR}")
    hparams_path = require_file(out_dir / HPARAMS_FILE, "is this a finetune/*.py out dir?")
    try:
        hparams = json.loads(hparams_path.read_text())
        hparams["method"]
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(hparams_path)) from None
    except (ValueError, KeyError, TypeError):
        raise BadValue(f"{hparams_path} is damaged (not the JSON a finetune/*.py run writes)") from None
    return hparams


def base_dir_of(out_dir: Path, hparams: dict, checkpoint_dir: Optional[Path] = None) -> Path:
    """The base checkpoint a LoRA or adapter out dir was trained from: `checkpoint_dir`, or the one it names."""
    base_dir = Path(checkpoint_dir or hparams["checkpoint_dir"])
    if checkpoint_dir is None and not base_dir.is_dir():
        raise MissingFile(f"{base_dir} not found: it is the base checkpoint {out_dir} was trained from; "
                          f"pass where it is now with --checkpoint_dir")
    return base_dir


def check_base(config: LLaMAConfig, base_dir: Path, out_dir: Path, tokenizer: Tokenizer) -> None:
    """Refuse a base (its model `config`, its dir) that `out_dir`, whose tokenizer is `tokenizer`, was not trained from."""
    expected = read_config(out_dir / CONFIG_FILE, "the out dir has no model config")
    if replace(config, vocab_size=expected.vocab_size, padded_vocab_size=expected.padded_vocab_size) != expected:
        raise BadValue(f"{base_dir} is not the base model {out_dir} was trained from (model configs differ); "
                       f"pass the right one with --checkpoint_dir")
    if Tokenizer.from_dir(base_dir).base_sha256 != tokenizer.base_sha256:  # same shapes, other ids: garbage out
        raise BadValue(f"{base_dir} has another tokenizer than the base model {out_dir} was trained from; "
                       f"pass the right one with --checkpoint_dir")


def load_trained(model: LLaMA, out_dir: Path, hparams: dict, base_dir: Path, assign: bool = False) -> None:
    """Give `model` (the base of `base_dir`, its vocabulary grown to the out dir's) the method's layers and
    the trained weights of `out_dir`, unmerged. `assign`: take the file's tensors as they are (a model on meta)."""
    method = method_of(hparams["method"])
    method.inject(model, method.config(**hparams[method.name]))
    weights_path = require_file(out_dir / method.weights_file, "the out dir has no trained weights")
    trained = load_state_dict(weights_path)
    attach_token_rows(model, trained["token_rows.ids"].tolist())  # shapes from the file, values loaded next
    try:
        missing, unexpected = model.load_state_dict(trained, strict=False, assign=assign)
    except RuntimeError as e:  # shapes that don't fit: another model size or LoRA rank
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if line.startswith("size mismatch")), " ".join(lines))
        raise BadValue(f"{weights_path} does not fit the model of {base_dir}: {why}") from None
    missing_trained = [k for k in missing if method.trains(k)]
    if missing_trained or unexpected:
        raise BadValue(f"{weights_path} does not fit the model: missing {missing_trained}, unexpected {unexpected}")


def load_finetuned(out_dir: Path, checkpoint_dir: Optional[Path] = None,
                   dtype: Optional[torch.dtype] = None) -> tuple[LLaMA, Tokenizer]:
    """Rebuild a fine-tune from its out dir alone: the base checkpoint it names (or `checkpoint_dir`),
    the extended vocabulary, the method's settings and trained weights. LoRA updates and special-token
    rows are merged into the weights, ready for inference."""
    hparams = read_hparams(out_dir)
    tokenizer = Tokenizer.from_dir(out_dir)
    if method_of(hparams["method"]).whole:
        return load_model(out_dir, dtype), tokenizer
    base_dir = base_dir_of(out_dir, hparams, checkpoint_dir)
    model = load_model(base_dir, dtype)
    check_base(model.config, base_dir, out_dir, tokenizer)
    grow_vocab(model, tokenizer.vocab_size)
    if hparams.get("quantize"):  # trained beside a quantized base: the weights it learned against
        round_trip(model, hparams["quantize"], frozen_dtype(hparams["precision"]))
    load_trained(model, out_dir, hparams, base_dir)
    merge_lora(model)
    merge_token_rows(model)
    return model, tokenizer
