"""Convert a Hugging Face Llama or Mistral checkpoint (config.json, safetensors or .bin weights, sharded
or not, tokenizer.model) into a checkpoint dir of this repo.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/Llama-2-7b-hf \\
        --output_dir checkpoints/Llama-2-7b
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.convert import DType, convert_hf_checkpoint


def main(checkpoint_dir: Path, output_dir: Path, dtype: Optional[DType] = None) -> None:
    """Write lit_model.pth, model_config.json and tokenizer.model to `output_dir`.

    Args:
        checkpoint_dir: the Hugging Face model dir, as downloaded
        output_dir: the checkpoint dir to write
        dtype: cast the weights to this dtype (default: keep the checkpoint's)
    """
    convert_hf_checkpoint(checkpoint_dir, output_dir, dtype)


if __name__ == "__main__":
    run(main)
