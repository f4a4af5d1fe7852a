"""Fold a LoRA fine-tune into a plain checkpoint dir (LoRA updates and the trained special-token rows
written into the weights), which generate/full.py, chat, evaluate_halting.py, the HF export and a
second round of fine-tuning load. An adapter out dir can't be folded (it adds attention to learned
prompts) and is refused.

    python scripts/merge_lora.py --lora_path out/lora --out_dir checkpoints/merged
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.checkpoint import load_finetuned, read_hparams, save_checkpoint_dir
from lit_llama.cli import run
from lit_llama.errors import BadValue
from lit_llama.files import check_writable


def main(lora_path: Path, out_dir: Path, checkpoint_dir: Optional[Path] = None) -> None:
    """Write the merged model to `out_dir`.

    Args:
        lora_path: a finetune/lora.py out dir
        out_dir: the checkpoint dir to write
        checkpoint_dir: the base checkpoint dir (default: the one the out dir was trained from)
    """
    method = read_hparams(lora_path)["method"]
    if method == "adapter":
        raise BadValue(f"--lora_path {lora_path} is an adapter out dir: an adapter adds attention to learned prompts, "
                       f"which no plain checkpoint holds. Generate with generate/adapter.py --adapter_path {lora_path}; "
                       "for a checkpoint to export or train again, fine-tune with finetune/lora.py or finetune/full.py")
    if method == "full":
        raise BadValue(f"--lora_path {lora_path} is a full fine-tune: it already is a checkpoint dir; give it as "
                       "--checkpoint_dir to the scripts that take one")
    model, tokenizer = load_finetuned(lora_path, checkpoint_dir)
    check_writable(out_dir, 0)
    save_checkpoint_dir(model, tokenizer, out_dir)
    print(f"merged {lora_path} into {out_dir} (vocabulary {model.config.vocab_size}, EOT id {tokenizer.eot_id})")


if __name__ == "__main__":
    run(main)
