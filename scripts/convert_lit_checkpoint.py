"""Export a checkpoint dir of this repo to the Hugging Face layout, for transformers and the tools
built on it. The exported generation_config.json stops generation on the end-of-turn token.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/merged --output_dir out/hf
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.convert import DType
from lit_llama.export import export_hf_checkpoint


def main(checkpoint_dir: Path, output_dir: Path, dtype: Optional[DType] = None) -> None:
    """Write model.safetensors, config.json, generation_config.json and the tokenizer files to `output_dir`.

    Args:
        checkpoint_dir: a plain checkpoint dir (lit_model.pth, model_config.json, tokenizer.model)
        output_dir: the Hugging Face model dir to write
        dtype: cast the weights to this dtype (default: keep the checkpoint's)
    """
    export_hf_checkpoint(checkpoint_dir, output_dir, dtype)


if __name__ == "__main__":
    run(main)
