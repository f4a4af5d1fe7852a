"""Generate with a LoRA fine-tune, rebuilt from its out dir alone (base checkpoint, LoRA settings and
the tokenizer with its end-of-turn token are read from it).

    python generate/lora.py --lora_path out/lora --prompt "How do plants drink water?"
    python generate/lora.py --lora_path out/lora --prompts_file prompts.jsonl --output_file replies.jsonl
"""

import sys
from pathlib import Path
from typing import Any, Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.inference import load_for_inference, reply


def main(lora_path: Path = Path("out/lora"), checkpoint_dir: Optional[Path] = None, **flags: Any) -> None:
    """Reply to a prompt in the training format; decoding stops at the end-of-turn token.

    Args:
        lora_path: a finetune/lora.py out dir
        checkpoint_dir: the base checkpoint dir (default: the one the out dir was trained from)
        flags: the prompt, sampling and output flags below
    """
    model, tokenizer = load_for_inference(checkpoint_dir, lora_path=lora_path)
    reply(model, tokenizer, **flags)


if __name__ == "__main__":
    run(main)
