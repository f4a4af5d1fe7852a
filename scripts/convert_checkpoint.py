"""Convert a checkpoint in Meta's original layout (params.json, consolidated.NN.pth model-parallel
shards, tokenizer.model) into a checkpoint dir of this repo.

    python scripts/convert_checkpoint.py --checkpoint_dir downloads/llama-2-7b --output_dir checkpoints/Llama-2-7b
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.convert import DType, convert_meta_checkpoint


def main(checkpoint_dir: Path, output_dir: Path, tokenizer_path: Optional[Path] = None,
         dtype: Optional[DType] = None) -> None:
    """Write lit_model.pth, model_config.json and tokenizer.model to `output_dir`.

    Args:
        checkpoint_dir: one model of Meta's download: the folder with params.json and consolidated.*.pth
        output_dir: the checkpoint dir to write
        tokenizer_path: the sentencepiece tokenizer.model (default: in checkpoint_dir or its parent)
        dtype: cast the weights to this dtype (default: keep the checkpoint's)
    """
    convert_meta_checkpoint(checkpoint_dir, output_dir, tokenizer_path, dtype)


if __name__ == "__main__":
    run(main)
