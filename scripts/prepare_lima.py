"""Prepare LIMA (GAIR/lima) for fine-tuning: add the end-of-turn token to the base tokenizer, encode
every conversation as `<bos> user <EOT> assistant <EOT> ...` (one sample per conversation, every
assistant turn trained), split into train and val, and write them with the extended tokenizer.

    python scripts/prepare_lima.py --data_path data/lima_sample.jsonl --checkpoint_dir checkpoints/tiny \\
        --destination_path data/lima

Without --data_path, LIMA's train.jsonl is downloaded from the Hugging Face Hub (a gated dataset:
accept its terms on the Hub, then `huggingface-cli login` or set HF_TOKEN).
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.errors import MissingFile, MissingPackage
from lit_llama.prepare import PrepareDirs, Samples, VocabChange, prepare_data
from lit_llama.prompts import conversation_segments
from lit_llama.records import lima_turns

LIMA_REPO = "GAIR/lima"


def download_lima() -> Path:
    """LIMA's train.jsonl from the Hugging Face Hub (cached there), with the token of the environment."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingPackage(f"no --data_path given and huggingface_hub is not installed to download {LIMA_REPO}: "
                             f"`pip install huggingface_hub`, or download its train.jsonl and pass --data_path") from None
    try:
        return Path(hf_hub_download(LIMA_REPO, "train.jsonl", repo_type="dataset"))
    except Exception as e:  # offline, gated without a token, ...: the hub raises many kinds
        raise MissingFile(f"could not download {LIMA_REPO} ({type(e).__name__}: {e}); it is gated: accept its terms on "
                          f"huggingface.co, log in (`huggingface-cli login` or HF_TOKEN), or pass --data_path") from None


def prepare(
    data_path: Optional[Path] = None,
    dirs: PrepareDirs = PrepareDirs(destination_path=Path("data/lima")),
    samples: Samples = Samples(),
    vocab: VocabChange = VocabChange(),
) -> None:
    """Prepare LIMA's conversations for fine-tuning, into `destination_path`.

    Args:
        data_path: LIMA as published: a JSONL file of rows {"conversations": [user, assistant, ...],
            "source": ...}, or a folder holding train.jsonl (test.jsonl has no replies to train on).
            Default: download train.jsonl of GAIR/lima from the Hugging Face Hub
    """
    if data_path is None:
        data_path = download_lima()
    data_path = Path(data_path)
    if data_path.is_dir():
        if not (data_path / "train.jsonl").is_file():
            raise MissingFile(f"--data_path {data_path} has no train.jsonl: give LIMA's folder or a JSONL file")
        data_path = data_path / "train.jsonl"
    prepare_data(data_path=data_path, dirs=dirs, samples=samples, vocab=vocab, settings={"format": "lima"},
                 layout=lambda record, tokenizer: conversation_segments(tokenizer, lima_turns(record), samples.mask_inputs))


if __name__ == "__main__":
    run(prepare)
