"""Generate a reply with a whole checkpoint dir: a finetune/full.py out dir or a merged LoRA
(scripts/merge_lora.py), whose tokenizer carries the end-of-turn token.

    python generate/full.py --checkpoint_dir out/full --prompt "How do plants drink water?"
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.checkpoint import load_model
from lit_llama.cli import run
from lit_llama.generate import reply
from lit_llama.tokenizer import Tokenizer


def main(
    prompt: str = "How do plants drink water?",
    checkpoint_dir: Path = Path("out/full"),
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
) -> None:
    """Print the model's reply to `prompt`, formatted as one user turn exactly as in training.
    Decoding stops at the end-of-turn token; the reason it stopped goes to stderr.

    Args:
        prompt: the user's message
        checkpoint_dir: a checkpoint dir with an end-of-turn token (finetune/full.py out dir, merged LoRA)
        max_new_tokens: most tokens to generate
        temperature: sampling temperature; 0 picks the most likely token every step
        top_k: sample among the k most likely tokens only
        seed: seed of the sampling
    """
    reply(load_model(checkpoint_dir), Tokenizer.from_dir(checkpoint_dir), prompt, max_new_tokens, temperature, top_k, seed)


if __name__ == "__main__":
    run(main)
