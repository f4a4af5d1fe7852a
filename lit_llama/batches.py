"""What training draws from prepared data: the order of the samples epoch after epoch, a second
split mixed in, and micro-batches padded into tensors.

Every order here is a pure function of its seed, so a resumed run draws exactly what the
uninterrupted run would have.
"""

from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import torch

from lit_llama.dataset import IGNORE_INDEX, TokenDataset
from lit_llama.errors import BadValue


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


@dataclass
class Mixture:
    """The samples training draws from: a task split and, optionally, a second split mixed in at
    `ratio` of its samples per task sample (DELIA's diverse data beside a small task set). Index i < the
    task's size is task sample i; the mix's samples follow."""

    task: TokenDataset
    mix: Optional[TokenDataset] = None
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.mix is not None and self.mix_per_epoch < 1:
            raise BadValue(f"--mix_ratio {self.ratio} mixes no sample into {len(self.task)} task samples: "
                           f"give at least {1 / len(self.task):.3g}")

    def __len__(self) -> int:
        return len(self.task) + (len(self.mix) if self.mix is not None else 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task[i] if i < len(self.task) else self.mix[i - len(self.task)]

    @property
    def lengths(self) -> torch.Tensor:
        return self.task.lengths if self.mix is None else torch.cat([self.task.lengths, self.mix.lengths])

    @property
    def mix_per_epoch(self) -> int:
        return 0 if self.mix is None else round(len(self.task) * self.ratio)

    @property
    def epoch_size(self) -> int:
        """Samples per epoch: every task sample once, and the mix's share."""
        return len(self.task) + self.mix_per_epoch

    def is_mix(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor(indices) >= len(self.task)

    def epochs(self, generator: torch.Generator, seed: int) -> Iterator[torch.Tensor]:
        """Each epoch's sample indices, shuffled by `generator`, forever: every task sample, and the
        epoch's share of the mix, taken in turn from the mix's own shuffles (seeded by `seed`), so that
        every mix sample comes once before any comes twice. Without a mix, an epoch is a permutation."""
        n = len(self.task)
        mix_order = shuffled_indices(len(self.mix), seed + 1) if self.mix is not None else None
        while True:
            pool = torch.arange(n)
            if mix_order is not None:
                pool = torch.cat([pool, n + torch.tensor(list(islice(mix_order, self.mix_per_epoch)))])
            yield pool[torch.randperm(len(pool), generator=generator)]


def random_batches(data: Mixture, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of consecutive samples of the shuffled epochs, forever; a batch may span two epochs."""
    indices = (i for epoch in data.epochs(torch.Generator().manual_seed(seed), seed) for i in epoch.tolist())
    while True:
        yield list(islice(indices, batch_size))


def length_grouped_batches(data: Mixture, batch_size: int, seed: int, group: int = 64) -> Iterator[list[int]]:
    """Batches of sample indices forever, each of samples of similar length, so padding costs little;
    reproducible from `seed`. Each shuffled epoch is sorted by length a run of `group` batches' worth
    at a time and cut into batches, and the batch order is shuffled: every sample of the epoch comes
    once, in batches that are still random in what they hold and when they come. Only the epoch's
    last batch may be short."""
    generator = torch.Generator().manual_seed(seed)
    lengths = data.lengths
    for order in data.epochs(generator, seed):
        batches = []
        for start in range(0, len(order), batch_size * group):
            run = order[start: start + batch_size * group]
            run = run[torch.argsort(lengths[run], stable=True)]
            batches += [run[i: i + batch_size].tolist() for i in range(0, len(run), batch_size)]
        yield from (batches[b] for b in torch.randperm(len(batches), generator=generator).tolist())
