"""Generate with a LLaMA-Adapter fine-tune, rebuilt from its out dir alone (base checkpoint, adapter
settings and the tokenizer with its end-of-turn token are read from it).

    python generate/adapter.py --adapter_path out/adapter --prompt "How do plants drink water?"
"""

import sys
from pathlib import Path
from typing import Any, Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.inference import load_for_inference, reply


def main(adapter_path: Path = Path("out/adapter"), checkpoint_dir: Optional[Path] = None, **flags: Any) -> None:
    """Reply to a prompt in the training format; decoding stops at the end-of-turn token.

    Args:
        adapter_path: a finetune/adapter.py out dir
        checkpoint_dir: the base checkpoint dir (default: the one the out dir was trained from)
        flags: the prompt, sampling and output flags below
    """
    model, tokenizer = load_for_inference(checkpoint_dir, adapter_path=adapter_path)
    reply(model, tokenizer, **flags)


if __name__ == "__main__":
    run(main)
