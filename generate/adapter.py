"""Generate with a LLaMA-Adapter fine-tune, rebuilt from its out dir alone (base checkpoint, adapter
settings and the tokenizer with its end-of-turn token are read from it).

    python generate/adapter.py --adapter_path out/adapter --prompt "How do plants drink water?"
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import REPLY_SAMPLING, ModelSource, Placement, Replies, reply


def main(
    adapter_path: Path = Path("out/adapter"),
    checkpoint_dir: Optional[Path] = None,
    replies: Replies = Replies(),
    sampling: Sampling = REPLY_SAMPLING,
    stopping: Stopping = Stopping(),
    placement: Placement = Placement(),
) -> None:
    """Reply to a prompt in the training format; decoding stops at the end-of-turn token.

    Args:
        adapter_path: a finetune/adapter.py out dir
        checkpoint_dir: the base checkpoint dir (default: the one the out dir was trained from)
    """
    model, tokenizer = ModelSource(adapter_path=adapter_path, checkpoint_dir=checkpoint_dir).load()
    reply(model, tokenizer, replies=replies, sampling=sampling, stopping=stopping, placement=placement)


if __name__ == "__main__":
    run(main)
