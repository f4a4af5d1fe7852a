"""Fine-tune with LoRA: low-rank updates on the attention weights (and optionally the MLP and head)
plus the rows of the special tokens; every other weight stays frozen.

    python finetune/lora.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --out_dir out/lora
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

from lit_llama.checkpoint import CONFIG_FILE, HPARAMS_FILE, LORA_FILE, atomic_save, load_model, write_json
from lit_llama.cli import run
from lit_llama.data import load_prepared
from lit_llama.lora import LoRAConfig, inject_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_llama.training import TrainArgs, default_precision, fit
from lit_llama.vocab import add_special_tokens, attach_token_rows


def setup(
    data_dir: Path,
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    out_dir: Path = Path("out/lora"),
    precision: Optional[str] = None,
    token_init: str = "mean",
    lora: LoRAConfig = LoRAConfig(),
    train: TrainArgs = TrainArgs(),
) -> None:
    """Fine-tune a base checkpoint with LoRA on data prepared by scripts/prepare_lima.py.

    Args:
        data_dir: prepared data: train.pt, val.pt and the tokenizer with the end-of-turn token
        checkpoint_dir: the base model: lit_model.pth, model_config.json, tokenizer.model
        out_dir: where the trained LoRA weights and everything needed to load them are written
        precision: Fabric precision, e.g. bf16-true or 32-true (default: bf16-true on a GPU that has it, else 32-true)
        token_init: how the special tokens' embedding and head rows start: mean, mean_noise, normal,
            copy:<piece> or describe:<text> (see howto/special_tokens.md)
        lora: which layers get LoRA, and its rank
        train: optimisation settings
    """
    fabric = L.Fabric(devices=1, precision=precision or default_precision())
    fabric.seed_everything(train.seed)
    tokenizer, train_data, val_data = load_prepared(data_dir, checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_model(checkpoint_dir)
    special_ids = add_special_tokens(model, tokenizer, token_init, seed=train.seed)
    attach_token_rows(model, special_ids)
    inject_lora(model, lora)
    mark_only_lora_as_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fabric.print(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} parameters "
                 f"({len(special_ids)} special-token rows); {len(train_data)} train / {len(val_data)} val samples")

    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay))
    losses = fit(fabric, model, optimizer, train_data, val_data, train, out_dir, pad_id=tokenizer.eos_id)

    if fabric.is_global_zero:
        atomic_save(lora_state_dict(model), out_dir / LORA_FILE)
        model.config.save(out_dir / CONFIG_FILE)
        tokenizer.save(out_dir)
        write_json({"method": "lora", "checkpoint_dir": checkpoint_dir.resolve(), "data_dir": Path(data_dir).resolve(),
                    "precision": precision or default_precision(), "token_init": token_init, "lora": asdict(lora), "train": asdict(train),
                    "final": losses}, out_dir / HPARAMS_FILE)
    fabric.print(f"final train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}; saved to {out_dir}")


if __name__ == "__main__":
    run(setup)
