"""Prepared data: encoding conversations into a token dataset, storing it, and batching it.

A prepared split is one file of three flat tensors (every sample end to end, plus offsets), not a
list of per-sample dicts: it loads with mmap in constant time and stays compact for millions of rows.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from lit_llama.prompts import EncodedConversation, encode_conversation
from lit_llama.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of positions that are not trained (F.cross_entropy's default ignore_index)
Overlong = Literal["drop", "cut_turns"]


@dataclass
class TokenDataset:
    input_ids: torch.Tensor  # (N,) int32: all samples end to end
    loss_mask: torch.Tensor  # (N,) bool: True where the id is a training target
    offsets: torch.Tensor  # (n + 1,) int64: sample i is input_ids[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.loss_mask[start:end]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    @classmethod
    def from_samples(cls, samples: list[EncodedConversation]) -> "TokenDataset":
        lengths = torch.tensor([0] + [len(s.ids) for s in samples], dtype=torch.int64)
        return cls(
            input_ids=torch.tensor([i for s in samples for i in s.ids], dtype=torch.int32),
            loss_mask=torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.bool),
            offsets=lengths.cumsum(0),
        )

    def save(self, path: Path) -> None:
        tmp = Path(f"{path}.tmp")
        torch.save({"input_ids": self.input_ids, "loss_mask": self.loss_mask, "offsets": self.offsets}, tmp)
        os.replace(tmp, path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: Path) -> "TokenDataset":
        return cls(**torch.load(path, mmap=True, weights_only=True))


@dataclass
class PrepareReport:
    read: int = 0
    kept: int = 0
    cut: int = 0  # kept with trailing turns removed to fit max_seq_length
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (f"read {self.read}, kept {self.kept} ({self.cut} cut at a turn boundary), dropped: {dropped}; "
                f"{self.tokens} tokens ({self.trained_tokens} trained), longest sample {self.longest} tokens")


def conversation_problem(row: object) -> Optional[str]:
    """Why a LIMA row can't be a training sample, or None when it can."""
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(turns, list):
        return "no 'conversations' list"
    if not all(isinstance(t, str) for t in turns):
        return "a turn that is not a string"
    if len(turns) < 2 or len(turns) % 2:
        return "not user/assistant pairs (odd or fewer than 2 turns)"
    if not all(t.strip() for t in turns):
        return "an empty turn"
    return None


def read_lima_jsonl(path: Path, report: PrepareReport) -> list[list[str]]:
    """The `conversations` of every usable row of a LIMA-format JSONL file. Rows that can't be used
    are counted in `report.dropped` by reason, and the first of each kind is named by file:line."""
    conversations = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.read += 1
            try:
                row = json.loads(raw.decode("utf-8"))
                problem = conversation_problem(row)
            except UnicodeDecodeError:
                problem = "invalid UTF-8"
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
            if problem is None:
                conversations.append(row["conversations"])
                continue
            if problem not in report.dropped:
                print(f"{path}:{line_no}: skipped: {problem} (more rows like it are only counted)", file=sys.stderr)
            report.drop(problem)
    return conversations


def encode_conversations(conversations: list[list[str]], tokenizer: Tokenizer, max_seq_length: int, report: PrepareReport,
                         mask_inputs: bool = True, overlong: Overlong = "drop") -> list[EncodedConversation]:
    """Encode each conversation; one longer than `max_seq_length` is dropped or cut after its last
    assistant turn that fits, never cut mid-turn (its final EOT is what teaches the model to stop)."""
    samples = []
    for turns in conversations:
        sample = encode_conversation(tokenizer, turns, mask_inputs)
        if len(sample.ids) > max_seq_length:
            if overlong == "drop":
                report.drop("longer than max_seq_length")
                continue
            # keep the longest prefix of whole user/assistant pairs that fits
            fits = [end for end in sample.turn_ends[1::2] if end <= max_seq_length]
            if not fits:
                report.drop("first exchange longer than max_seq_length")
                continue
            end = fits[-1]
            n_turns = sample.turn_ends.index(end) + 1
            sample = EncodedConversation(sample.ids[:end], sample.loss_mask[:end], sample.turn_ends[:n_turns])
            report.cut += 1
        samples.append(sample)
        report.kept += 1
        report.tokens += len(sample.ids)
        report.trained_tokens += sum(sample.loss_mask)
        report.longest = max(report.longest, len(sample.ids))
    return samples


def count_repurposed(conversations: list[list[str]], base: Tokenizer, tokenizer: Tokenizer) -> int:
    """How often the base tokenizer encodes the data to a piece that `tokenizer` repurposed. Those
    places now encode to other pieces (the text is kept), but the model saw that piece there in
    pretraining, so a user should know."""
    repurposed = {t.id for t in tokenizer.special if t.mode == "repurposed"}
    if not repurposed:
        return 0
    return sum(i in repurposed for turns in conversations for text in turns for i in base.encode(text))


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sample. Returns input ids and labels (B, T), labels aligned with the
    inputs (the loss shifts them) and IGNORE_INDEX wherever nothing is trained, padding included."""
    T = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.int64)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.int64)
    for row, (ids, mask) in enumerate(samples):
        ids = ids.long()
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = torch.where(mask, ids, IGNORE_INDEX)
    return input_ids, labels


def shuffled_indices(n: int, seed: int) -> Iterator[int]:
    """Sample indices forever, one fresh permutation per epoch, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def load_prepared(data_dir: Path, checkpoint_dir: Path) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """The tokenizer, train and val splits written by a prepare script, after checking that the data
    was encoded with (an extension of) the checkpoint's own tokenizer."""
    data_dir = Path(data_dir)
    tokenizer = Tokenizer.from_dir(data_dir)
    base = Tokenizer.from_dir(checkpoint_dir)
    if tokenizer.base_sha256 != base.base_sha256:
        raise ValueError(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; "
                         f"run the prepare script again with --checkpoint_dir {checkpoint_dir}")
    splits = []
    for name in ("train", "val"):
        path = data_dir / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: prepare the data first (scripts/prepare_lima.py)")
        splits.append(TokenDataset.load(path))
    return tokenizer, splits[0], splits[1]
