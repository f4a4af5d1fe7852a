"""Checkpoint dirs: what they hold, how to load them lean, how to write them safely.

A base checkpoint dir:   lit_model.pth, model_config.json, tokenizer.model [, special_tokens.json]
A LoRA out dir adds:     lit_model_lora.pth (LoRA matrices + special-token rows), hyperparameters.json
                         (method, base checkpoint dir, LoRA settings, training settings), metrics.csv
"""

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lit_llama.lora import LoRAConfig, inject_lora, merge_lora
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import Tokenizer
from lit_llama.vocab import attach_token_rows, grow_vocab, merge_token_rows

MODEL_FILE = "lit_model.pth"
LORA_FILE = "lit_model_lora.pth"
CONFIG_FILE = "model_config.json"
HPARAMS_FILE = "hyperparameters.json"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def require_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return Path(path)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (no pickled code), memory-mapped: nothing is read until it is used."""
    return torch.load(path, mmap=True, weights_only=True)


def load_model(checkpoint_dir: Path, dtype: Optional[torch.dtype] = None) -> LLaMA:
    """The model of a checkpoint dir, built on the meta device and given the mmapped tensors as its
    parameters (no random init, no second copy). Stays on the CPU; move it where it should run."""
    checkpoint_dir = Path(checkpoint_dir)
    config = LLaMAConfig.from_json(require_file(checkpoint_dir / CONFIG_FILE, "is this a checkpoint dir? "
                                                "Make one with scripts/prepare_tiny.py or scripts/convert_hf_checkpoint.py"))
    with torch.device("meta"):
        model = LLaMA(config)
    state = load_state_dict(require_file(checkpoint_dir / MODEL_FILE, "the checkpoint dir has no weights"))
    model.load_state_dict(state, assign=True)
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


def load_lora_model(lora_path: Path, checkpoint_dir: Optional[Path] = None,
                    dtype: Optional[torch.dtype] = None) -> tuple[LLaMA, Tokenizer]:
    """Rebuild a LoRA fine-tune from its out dir alone: the base checkpoint it names (or
    `checkpoint_dir`), the extended vocabulary, LoRA settings and trained weights, merged for inference."""
    lora_path = Path(lora_path)
    hparams = json.loads(require_file(lora_path / HPARAMS_FILE, "is this a finetune/lora.py out dir?").read_text())
    checkpoint_dir = Path(checkpoint_dir or hparams["checkpoint_dir"])
    model = load_model(checkpoint_dir, dtype)
    tokenizer = Tokenizer.from_dir(lora_path)
    grow_vocab(model, tokenizer.vocab_size)
    inject_lora(model, LoRAConfig(**hparams["lora"]))
    trained = load_state_dict(require_file(lora_path / LORA_FILE, "the out dir has no trained weights"))
    if any(name.startswith("token_rows.") for name in trained):
        # the rows' shapes come from the file; their values are loaded just below
        attach_token_rows(model, trained["token_rows.ids"].tolist())
    missing, unexpected = model.load_state_dict(trained, strict=False)
    missing_trained = [k for k in missing if "lora_" in k or k.startswith("token_rows.")]
    if missing_trained or unexpected:
        raise ValueError(f"{lora_path / LORA_FILE} does not fit the model: missing {missing_trained}, unexpected {unexpected}")
    merge_lora(model)
    merge_token_rows(model)
    return model, tokenizer
