import itertools
from collections import Counter

import pytest
import torch

from lit_llama.batches import Mixture, collate, length_grouped_batches, random_batches, shuffled_indices
from lit_llama.dataset import IGNORE_INDEX, TokenDataset


def dataset_of_lengths(lengths: torch.Tensor) -> TokenDataset:
    n = int(lengths.sum())
    return TokenDataset(torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.bool),
                        torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))


def test_collate_pads_right_and_never_trains_padding():
    a = (torch.tensor([1, 5, 6]), torch.tensor([False, True, True]))
    b = (torch.tensor([1, 7]), torch.tensor([False, True]))
    input_ids, labels = collate([a, b], pad_id=2)
    assert input_ids.tolist() == [[1, 5, 6], [1, 7, 2]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]


def test_length_grouped_batches_cover_each_epoch_with_little_padding():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))
    data = Mixture(dataset_of_lengths(lengths))
    batches = length_grouped_batches(data, batch_size=8, seed=3, group=16)
    epoch = list(itertools.islice(batches, 125))
    assert sorted(i for b in epoch for i in b) == list(range(1000)) and all(len(b) == 8 for b in epoch)
    padding = sum(int(lengths[b].max() - lengths[b].min()) for b in epoch) / len(epoch)
    random_padding = sum(int(lengths[b].max() - lengths[b].min()) for b in torch.randperm(1000).view(-1, 8)) / 125
    assert padding < random_padding / 10
    next_epoch = list(itertools.islice(batches, 125))
    assert sorted(i for b in next_epoch for i in b) == list(range(1000)) and next_epoch != epoch
    assert list(itertools.islice(length_grouped_batches(data, 8, seed=3, group=16), 125)) == epoch  # from the seed
    # a last, short batch keeps every sample in the epoch
    short = Mixture(dataset_of_lengths(lengths[:10]))
    assert sorted(len(b) for b in itertools.islice(length_grouped_batches(short, 4, seed=0), 3)) == [2, 4, 4]


def test_without_a_mix_an_epoch_is_one_permutation_as_before():
    data = Mixture(dataset_of_lengths(torch.full((10,), 3)))
    assert data.epoch_size == 10 and not data.is_mix(list(range(10))).any()
    batches = list(itertools.islice(random_batches(data, 4, seed=7), 10))  # 4 epochs
    assert sum(batches, []) == list(itertools.islice(shuffled_indices(10, 7), 40))


@pytest.mark.parametrize("ratio, mix_size", [(2.5, 7), (2.5, 100), (0.5, 3)])
def test_a_mix_adds_its_share_to_every_epoch_and_each_mix_sample_comes_once_before_twice(ratio, mix_size):
    task = dataset_of_lengths(torch.full((4,), 5))
    mix = dataset_of_lengths(torch.arange(1, mix_size + 1))
    data = Mixture(task, mix, ratio)
    per_epoch = round(4 * ratio)
    assert len(data) == 4 + mix_size and data.mix_per_epoch == per_epoch and data.epoch_size == 4 + per_epoch
    assert data.lengths.tolist() == [5] * 4 + list(range(1, mix_size + 1))
    assert data[4][0].shape == (1,) and data[3][0].shape == (5,)  # index 4 is the mix's first sample

    epochs = list(itertools.islice(data.epochs(torch.Generator().manual_seed(0), seed=0), 6))
    drawn = Counter()
    for epoch in epochs:
        epoch = epoch.tolist()
        assert sorted(i for i in epoch if i < 4) == [0, 1, 2, 3]  # every task sample, once
        mixed = [i - 4 for i in epoch if i >= 4]
        assert len(mixed) == per_epoch
        drawn.update(mixed)
        # the mix is drawn in whole passes: no sample has come twice more than another
        assert max(drawn.values()) - min(drawn.get(i, 0) for i in range(mix_size)) <= 1
    # shuffled together, not the task first: some mix sample precedes some task sample
    assert any(e.tolist().index(max(e.tolist())) < max(e.tolist().index(i) for i in range(4)) for e in epochs)

    again = list(itertools.islice(data.epochs(torch.Generator().manual_seed(0), seed=0), 6))
    assert all(torch.equal(a, b) for a, b in zip(epochs, again))  # a pure function of the seeds
    other = list(itertools.islice(data.epochs(torch.Generator().manual_seed(0), seed=1), 6))
    assert not all(torch.equal(a, b) for a, b in zip(epochs, other))

    batch = list(range(2, 7))
    assert data.is_mix(batch).tolist() == [False, False, True, True, True]
    first_epoch = sum(itertools.islice(length_grouped_batches(data, 2, seed=0), -(-data.epoch_size // 2)), [])
    assert sorted(i for i in first_epoch if i < 4) == [0, 1, 2, 3] and len(first_epoch) == data.epoch_size


def test_a_mix_ratio_that_mixes_nothing_in_is_refused():
    task = dataset_of_lengths(torch.full((4,), 5))
    with pytest.raises(ValueError, match="--mix_ratio 0.1 mixes no sample into 4 task samples"):
        Mixture(task, dataset_of_lengths(torch.full((3,), 2)), 0.1)
