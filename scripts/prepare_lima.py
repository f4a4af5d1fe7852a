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
from lit_llama.data import Overlong, lima_turns, prepare_data
from lit_llama.prompts import conversation_segments

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
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    destination_path: Path = Path("data/lima"),
    max_seq_length: Optional[int] = None,
    val_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    overlong: Overlong = "drop",
    eot_token: Optional[str] = None,
    repurpose_eot: Optional[str] = None,
    allow_repurposed_in_data: bool = False,
    extra_special_tokens: Optional[list[str]] = None,
    strict: bool = False,
    role_tokens: bool = False,
) -> None:
    """Write train.pt, val.pt, tokenizer.model, special_tokens.json and prepare.json to `destination_path`.

    Args:
        data_path: LIMA as published: a JSONL file of rows {"conversations": [user, assistant, ...],
            "source": ...}, or a folder holding train.jsonl (test.jsonl has no replies to train on).
            Default: download train.jsonl of GAIR/lima from the Hugging Face Hub
        checkpoint_dir: the base checkpoint whose tokenizer gets the end-of-turn token
        destination_path: where the prepared data goes
        max_seq_length: longest sample in tokens (default: the model's block_size)
        val_split_fraction: share of conversations held out for validation
        seed: seed of the train/val split
        mask_inputs: train only on assistant turns (and their end-of-turn token), not on user turns
        overlong: what to do with a conversation longer than max_seq_length: drop it, or cut_turns
            (keep its leading user/assistant pairs that fit)
        eot_token: the end-of-turn token's name (default <|eot|>), appended to the vocabulary as a new id;
            a checkpoint that already has one (for a second round of fine-tuning) keeps its own
        repurpose_eot: give the end-of-turn role to an existing piece instead, by its exact text or id:
            a rare ordinary piece ("▁zebra") or a reserved control piece ("[control_20]"). It is renamed
            to the end-of-turn name, so no tool finds it in text; the vocabulary keeps its size
        allow_repurposed_in_data: prepare even when the data contains the repurposed piece (its text is
            then encoded with other pieces)
        extra_special_tokens: more special tokens to append after the end-of-turn token (e.g. role tokens)
        strict: fail (exit code 2) when any row is dropped, instead of only counting it
        role_tokens: mark each turn with a role token, <|SYSTEM|>, <|USER|> or <|ASSISTANT|>, appended to the
            vocabulary (StableLM\'s); generation, chat and the export then format prompts with them
    """
    if data_path is None:
        data_path = download_lima()
    data_path = Path(data_path)
    if data_path.is_dir():
        if not (data_path / "train.jsonl").is_file():
            raise MissingFile(f"--data_path {data_path} has no train.jsonl: give LIMA's folder or a JSONL file")
        data_path = data_path / "train.jsonl"
    prepare_data(
        data_path, lambda row, tokenizer: conversation_segments(tokenizer, lima_turns(row), mask_inputs),
        checkpoint_dir=checkpoint_dir, destination_path=destination_path, max_seq_length=max_seq_length,
        val_split_fraction=val_split_fraction, seed=seed, overlong=overlong, eot_token=eot_token,
        repurpose_eot=repurpose_eot, allow_repurposed_in_data=allow_repurposed_in_data,
        extra_special_tokens=extra_special_tokens, strict=strict, role_tokens=role_tokens,
        settings={"format": "lima", "mask_inputs": mask_inputs, "system_text": False})


if __name__ == "__main__":
    run(prepare)
