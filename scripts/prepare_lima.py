"""Prepare LIMA-format conversations for fine-tuning: add the end-of-turn token to the base
tokenizer, encode every conversation as `<bos> user <EOT> assistant <EOT> ...`, split into train and
val, and write them with the extended tokenizer.

    python scripts/prepare_lima.py --data_path data/lima_sample.jsonl --checkpoint_dir checkpoints/tiny \\
        --destination_path data/lima
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lit_llama.checkpoint import CONFIG_FILE, write_json
from lit_llama.cli import run
from lit_llama.data import Overlong, PrepareReport, TokenDataset, count_repurposed, encode_conversations, read_lima_jsonl
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer, extend_tokenizer


def prepare(
    data_path: Path,
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    destination_path: Path = Path("data/lima"),
    max_seq_length: Optional[int] = None,
    val_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    overlong: Overlong = "drop",
    eot_token: str = DEFAULT_EOT,
    repurpose_eot: Optional[str] = None,
    allow_repurposed_in_data: bool = False,
    extra_special_tokens: Optional[list[str]] = None,
) -> None:
    """Write train.pt, val.pt, tokenizer.model and special_tokens.json to `destination_path`.

    Args:
        data_path: a LIMA-format JSONL file (rows of {"conversations": [user, assistant, ...]}),
            or a folder holding train.jsonl
        checkpoint_dir: the base checkpoint whose tokenizer gets the end-of-turn token
        destination_path: where the prepared data goes
        max_seq_length: longest sample in tokens (default: the model's block_size)
        val_split_fraction: share of conversations held out for validation
        seed: seed of the train/val split
        mask_inputs: train only on assistant turns (and their end-of-turn token), not on user turns
        overlong: what to do with a conversation longer than max_seq_length: drop it, or cut_turns
            (keep its leading user/assistant pairs that fit)
        eot_token: the end-of-turn token's text, appended to the vocabulary as a new id
        repurpose_eot: give the end-of-turn role to an existing piece instead, named by its exact text
            (e.g. "▁zebra") or id; the vocabulary keeps its size
        allow_repurposed_in_data: prepare even when the data contains the repurposed piece (its text is
            then encoded with other pieces)
        extra_special_tokens: more special tokens to append after the end-of-turn token (e.g. role tokens)
    """
    data_path = Path(data_path)
    if data_path.is_dir():
        data_path = data_path / "train.jsonl"
    if not data_path.is_file():
        raise FileNotFoundError(f"--data_path {data_path} not found")
    if not 0 < val_split_fraction < 1:
        raise ValueError(f"--val_split_fraction must be between 0 and 1, got {val_split_fraction}")
    config = LLaMAConfig.from_json(Path(checkpoint_dir) / CONFIG_FILE)
    max_seq_length = max_seq_length or config.block_size
    if max_seq_length > config.block_size:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}")

    base = Tokenizer.from_dir(checkpoint_dir)
    tokenizer = extend_tokenizer(base, eot_token, repurpose_eot, extra_special_tokens or [])
    report = PrepareReport()
    conversations = read_lima_jsonl(data_path, report)
    if repurpose_eot is not None:
        found = count_repurposed(conversations, base, tokenizer)
        eot_piece = base.processor.id_to_piece(tokenizer.eot_id)
        if found and not allow_repurposed_in_data:
            raise ValueError(f"{data_path}: the repurposed piece {eot_piece!r} occurs {found} times in the data; pick a "
                             f"rarer piece, or pass --allow_repurposed_in_data true to encode those places with other pieces")
        print(f"the repurposed piece {eot_piece!r} (id {tokenizer.eot_id}) occurs {found} times in the data"
              + (" (encoded with other pieces)" if found else ""))
    samples = encode_conversations(conversations, tokenizer, max_seq_length, report, mask_inputs, overlong)
    print(report.summary())
    if len(samples) < 2:
        raise ValueError(f"{data_path}: {len(samples)} usable conversations; need at least 2 (one for validation)")

    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_split_fraction)))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    destination_path.mkdir(parents=True, exist_ok=True)
    for name, indices in splits.items():
        TokenDataset.from_samples([samples[i] for i in indices]).save(destination_path / f"{name}.pt")
    tokenizer.save(destination_path)
    write_json({"data_path": data_path.resolve(), "checkpoint_dir": Path(checkpoint_dir).resolve(),
                "max_seq_length": max_seq_length, "mask_inputs": mask_inputs, "special_tokens": [asdict(t) for t in tokenizer.special], "eot_id": tokenizer.eot_id,
                "train": len(splits["train"]), "val": n_val, "report": asdict(report)}, destination_path / "prepare.json")
    eot = next(t for t in tokenizer.special if t.id == tokenizer.eot_id)
    print(f"{len(splits['train'])} train and {n_val} val samples, EOT {eot.content!r} = id {eot.id} ({eot.mode}), "
          f"written to {destination_path}")


if __name__ == "__main__":
    run(prepare)
