"""Generate a reply with a LoRA fine-tune, rebuilt from its out dir alone.

    python generate/lora.py --lora_path out/lora --prompt "How do plants drink water?"
"""

import sys
import time
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lit_llama.checkpoint import load_lora_model
from lit_llama.cli import run
from lit_llama.generate import generate, inference_device_dtype, stop_reason
from lit_llama.prompts import encode_prompt


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
    device, dtype = inference_device_dtype()
    model, tokenizer = load_lora_model(lora_path, checkpoint_dir)
    model = model.to(device=device, dtype=dtype).eval()
    prompt_ids = encode_prompt(tokenizer, [prompt])
    generator = torch.Generator(device).manual_seed(seed)

    start = time.perf_counter()
    result = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                      stop_ids=tuple(tokenizer.stop_ids), generator=generator)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(result.tokens))
    print(f"stop reason: {stop_reason(result, tokenizer)} after {len(result.tokens)} tokens "
          f"({len(result.tokens) / elapsed:.1f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    run(main)
