"""Generate with a whole checkpoint dir that knows the end-of-turn token: a finetune/full.py out dir
or a merged LoRA (scripts/merge_lora.py).

    python generate/full.py --checkpoint_dir out/full --prompt "How do plants drink water?"
"""

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import REPLY_SAMPLING, ModelSource, Placement, Replies, reply


def main(
    checkpoint_dir: Path = Path("out/full"),
    replies: Replies = Replies(),
    sampling: Sampling = REPLY_SAMPLING,
    stopping: Stopping = Stopping(),
    placement: Placement = Placement(),
) -> None:
    """Reply to a prompt in the training format; decoding stops at the end-of-turn token.

    Args:
        checkpoint_dir: a checkpoint dir with an end-of-turn token (finetune/full.py out dir, merged LoRA)
    """
    model, tokenizer = ModelSource(checkpoint_dir=checkpoint_dir).load()
    reply(model, tokenizer, replies=replies, sampling=sampling, stopping=stopping, placement=placement)


if __name__ == "__main__":
    run(main)
