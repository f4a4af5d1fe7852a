"""A prepared split on disk and the loaders fine-tuning reads it with (`batches.py` draws training's
micro-batches from it).

A split is one file of three flat tensors (every sample end to end, plus offsets), not a list of
per-sample dicts: it loads with mmap in constant time and stays compact for millions of samples.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_llama.checkpoint import MAKE_CHECKPOINT
from lit_llama.errors import BadValue, MissingFile, file_error
from lit_llama.files import atomic_save, require_dir
from lit_llama.prompts import EncodedConversation
from lit_llama.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of positions that are not trained (F.cross_entropy's default ignore_index)


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

    @classmethod
    def concat(cls, parts: list["TokenDataset"]) -> "TokenDataset":
        empty = cls.from_samples([])  # keeps dtypes when `parts` is empty
        lengths = torch.cat([empty.offsets, *(p.lengths for p in parts)])
        return cls(input_ids=torch.cat([empty.input_ids, *(p.input_ids for p in parts)]),
                   loss_mask=torch.cat([empty.loss_mask, *(p.loss_mask for p in parts)]),
                   offsets=lengths.cumsum(0))

    def select(self, indices: torch.Tensor) -> "TokenDataset":
        """The samples at `indices`, in that order."""
        starts, ends = self.offsets[indices].tolist(), self.offsets[indices + 1].tolist()
        lengths = torch.tensor([0] + [e - s for s, e in zip(starts, ends)], dtype=torch.int64)
        return TokenDataset(input_ids=torch.cat([self.input_ids[:0], *(self.input_ids[s:e] for s, e in zip(starts, ends))]),
                            loss_mask=torch.cat([self.loss_mask[:0], *(self.loss_mask[s:e] for s, e in zip(starts, ends))]),
                            offsets=lengths.cumsum(0))

    def save(self, path: Path) -> None:
        """Written whole or not at all, and on the disk before its name: see lit_llama/files.py."""
        atomic_save({"input_ids": self.input_ids, "loss_mask": self.loss_mask, "offsets": self.offsets}, path)

    @classmethod
    def load(cls, path: Path) -> "TokenDataset":
        """A split a prepare script wrote; one cut short or damaged (a full disk, a copy stopped midway)
        is named in one line."""
        try:
            return cls(**torch.load(path, mmap=True, weights_only=True, map_location="cpu"))
        except OSError as e:  # there but unreadable (permissions)
            raise file_error(e, str(path)) from None
        except (RuntimeError, EOFError, pickle.UnpicklingError, TypeError):  # TypeError: not the three tensors
            raise BadValue(f"{path} is truncated or corrupted, or not a split a scripts/prepare_*.py script wrote: "
                           f"prepare the data again") from None


def load_prepared(data_dir: Path, checkpoint_dir: Path) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """The tokenizer, train and val splits written by a prepare script, after checking that the data
    was encoded with (an extension of) the checkpoint's own tokenizer."""
    data_dir = require_dir(data_dir, "--data_dir", "prepare the data first with a scripts/prepare_*.py script")
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", "the base checkpoint the data was prepared for; "
                                 + MAKE_CHECKPOINT)
    tokenizer = Tokenizer.from_dir(data_dir)
    base = Tokenizer.from_dir(checkpoint_dir)
    if tokenizer.base_sha256 != base.base_sha256:
        raise BadValue(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; "
                       f"run the prepare script again with --checkpoint_dir {checkpoint_dir}")
    splits = []
    for name in ("train", "val"):
        path = data_dir / f"{name}.pt"
        if not path.is_file():
            raise MissingFile(f"{path} not found: prepare the data first (scripts/prepare_lima.py)")
        splits.append(TokenDataset.load(path))
    return tokenizer, splits[0], splits[1]


def load_mix(mix_dir: Path, data_dir: Path, tokenizer: Tokenizer) -> TokenDataset:
    """The train split of a second prepared data dir to mix in (`--mix_dir`), which must have been
    encoded with the very tokenizer of the task data (`tokenizer`, from `data_dir`): same pieces, same
    special tokens at the same ids."""
    mix_dir = require_dir(mix_dir, "--mix_dir", "prepare it first with a scripts/prepare_*.py script")
    mixed = Tokenizer.from_dir(mix_dir)
    if (mixed.model_proto, mixed.special_tokens) != (tokenizer.model_proto, tokenizer.special_tokens):
        raise BadValue(f"--mix_dir {mix_dir} was prepared with another tokenizer than --data_dir {data_dir} "
                       f"(special tokens {mixed.special_tokens} against {tokenizer.special_tokens}): prepare it "
                       f"again with the same --checkpoint_dir and special-token flags")
    path = mix_dir / "train.pt"
    if not path.is_file():
        raise MissingFile(f"{path} not found: prepare --mix_dir again")
    return TokenDataset.load(path)
