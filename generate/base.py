"""Generate with a base checkpoint dir, as converted or made by scripts/prepare_tiny.py. A base
tokenizer has no end-of-turn token: the prompt goes in as plain text and decoding stops on EOS.

    python generate/base.py --checkpoint_dir checkpoints/tiny --prompt "The river" --temperature 0
"""

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import REPLY_SAMPLING, ModelSource, Placement, Replies, reply


def main(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    replies: Replies = Replies(),
    sampling: Sampling = REPLY_SAMPLING,
    stopping: Stopping = Stopping(),
    placement: Placement = Placement(),
) -> None:
    """Continue a prompt with a base model (plain text, stops on EOS); with a checkpoint dir that has an
    end-of-turn token, reply in the training format as generate/full.py does.

    Args:
        checkpoint_dir: a base checkpoint dir (scripts/convert_hf_checkpoint.py, scripts/prepare_tiny.py)
    """
    model, tokenizer = ModelSource(checkpoint_dir=checkpoint_dir).load()
    reply(model, tokenizer, replies=replies, sampling=sampling, stopping=stopping, placement=placement)


if __name__ == "__main__":
    run(main)
