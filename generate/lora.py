"""Generate a reply with a LoRA fine-tune, rebuilt from its out dir alone.

    python generate/lora.py --lora_path out/lora --prompt "How do plants drink water?"
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.checkpoint import load_finetuned
from lit_llama.cli import run
from lit_llama.generate import reply


def main(
    prompt: str = "How do plants drink water?",
    lora_path: Path = Path("out/lora"),
    checkpoint_dir: Optional[Path] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
) -> None:
    """Print the model's reply to `prompt`, formatted as one user turn exactly as in training.
    Decoding stops at the end-of-turn token; the reason it stopped goes to stderr.

    Args:
        prompt: the user's message
        lora_path: a finetune/lora.py out dir
        checkpoint_dir: the base checkpoint dir (default: the one the out dir was trained from)
        max_new_tokens: most tokens to generate
        temperature: sampling temperature; 0 picks the most likely token every step
        top_k: sample among the k most likely tokens only
        seed: seed of the sampling
    """
    model, tokenizer = load_finetuned(lora_path, checkpoint_dir)
    reply(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)


if __name__ == "__main__":
    run(main)
