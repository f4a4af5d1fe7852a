"""Write a LoRA fine-tune as a PEFT adapter (adapter_config.json, adapter_model.safetensors and the
fine-tune's tokenizer files), unmerged: transformers with PEFT, vLLM (--enable-lora) and llama.cpp
(convert_lora_to_gguf.py) load it beside the base model in Hugging Face's layout
(scripts/convert_lit_checkpoint.py writes that from the base checkpoint).

    python scripts/export_peft.py --lora_path out/lora --output_dir out/lora-peft
    python scripts/export_peft.py --lora_path out/lora --output_dir out/lora-peft --base_model meta-llama/Llama-2-7b-hf

The special tokens' trained rows go as a LoRA on embed_tokens and lm_head, which needs a repurposed
end-of-turn token (prepare with --repurpose_eot): an appended one grows the vocabulary, which no
adapter carries (merge with scripts/merge_lora.py instead). See howto/export.md.
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.files import require_dir
from lit_llama.peft import export_peft


def main(lora_path: Path, output_dir: Path, base_model: Optional[str] = None,
         checkpoint_dir: Optional[Path] = None) -> None:
    """Export the LoRA out dir as a PEFT adapter.

    Args:
        lora_path: a finetune/lora.py out dir
        output_dir: the adapter dir to write
        base_model: the base model's name in adapter_config.json (a hub id or a path; default: the base
            checkpoint dir the out dir names)
        checkpoint_dir: the base checkpoint the LoRA was trained on, where it is now (default: the one the
            out dir names); its embedding and head rows are read for the special tokens' change
    """
    export_peft(require_dir(lora_path, "--lora_path", "give a finetune/lora.py out dir"), output_dir, base_model,
                checkpoint_dir)


if __name__ == "__main__":
    run(main)
