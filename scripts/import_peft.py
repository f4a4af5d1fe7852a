"""Turn a PEFT LoRA adapter for a Llama model (from transformers, axolotl, torchtune, or
scripts/export_peft.py) into a finetune/lora.py out dir, which generate, chat, serve and merge read.

    python scripts/import_peft.py --adapter_dir adapters/my-lora --checkpoint_dir checkpoints/Llama-2-7b-hf --out_dir out/my-lora
    python generate/lora.py --lora_path out/my-lora --prompt "How do plants drink water?"

The base is our checkpoint of the model the adapter was trained on (scripts/convert_hf_checkpoint.py).
A plain LoRA imports: one rank and alpha, on any of q, k, v, o and the MLP's three projections
together, and on lm_head. DoRA, rsLoRA, per-module ranks and saved whole modules are refused in one
line. See howto/export.md.
"""

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.files import require_dir
from lit_llama.peft import import_peft


def main(adapter_dir: Path, checkpoint_dir: Path, out_dir: Path) -> None:
    """Import the PEFT adapter as a LoRA out dir.

    Args:
        adapter_dir: the adapter: adapter_config.json and adapter_model.safetensors
        checkpoint_dir: our checkpoint dir of the base model the adapter was trained on
        out_dir: the LoRA out dir to write
    """
    import_peft(require_dir(adapter_dir, "--adapter_dir", "give a PEFT adapter dir"),
                require_dir(checkpoint_dir, "--checkpoint_dir", "give the base model's checkpoint dir"), out_dir)


if __name__ == "__main__":
    run(main)
