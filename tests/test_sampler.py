import itertools
import random

import numpy as np
import pytest
import torch

from mask2former.training.sampler import SeededDataset, TrainSampler, derive_seed


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_each_epoch_is_a_seeded_permutation():
    sampler = TrainSampler(10, seed=3)
    stream = take(sampler, 30)
    for epoch in range(3):
        chunk = stream[epoch * 10:(epoch + 1) * 10]
        assert {e for e, _ in chunk} == {epoch}
        assert sorted(i for _, i in chunk) == list(range(10))
    orders = [[i for _, i in stream[k * 10:(k + 1) * 10]] for k in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert take(TrainSampler(10, seed=3), 30) == stream
    assert take(TrainSampler(10, seed=4), 10) != stream[:10]


def test_ranks_split_the_epoch_like_distributed_sampler():
    full = TrainSampler(10, seed=1).epoch_order(0)
    rank0 = TrainSampler(10, seed=1, rank=0, world_size=2).epoch_indices(0)
    rank1 = TrainSampler(10, seed=1, rank=1, world_size=2).epoch_indices(0)
    assert rank0 == full[0::2] and rank1 == full[1::2]
    # 10 samples over 3 processes: padded to 12 by repeating the start of the order.
    parts = [TrainSampler(10, seed=1, rank=r, world_size=3).epoch_indices(0) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(sum(parts, [])) == sorted(full + full[:2])


def test_start_continues_the_stream():
    stream = take(TrainSampler(7, seed=0, rank=1, world_size=2), 20)
    for start in (0, 3, 4, 9):
        assert take(TrainSampler(7, seed=0, rank=1, world_size=2, start=start), 20 - start) == stream[start:]


def test_state_carries_over_to_another_world_size():
    one = TrainSampler(8, seed=0, world_size=1)
    state = one.state_dict(samples_consumed=8 + 4)  # epoch 1, position 4
    assert (state["epoch"], state["position"]) == (1, 4)
    two = TrainSampler(8, seed=0, rank=0, world_size=2)
    start = two.start_from_state(state)
    assert two.position(start) == (1, 2)
    with pytest.raises(ValueError, match="8 samples"):
        TrainSampler(9, seed=0).start_from_state(state)


class RandomSamples:
    """Each item draws from the global RNGs, like a random augmentation."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        return (index, torch.rand(2).tolist(), float(np.random.rand()), random.random())


def test_seeded_dataset_depends_only_on_seed_epoch_index():
    dataset = SeededDataset(RandomSamples(), seed=11)
    first = dataset[(2, 3)]
    torch.manual_seed(123)
    np.random.seed(5)
    before = torch.get_rng_state()
    again = [dataset[(0, 1)], dataset[(2, 3)]][1]
    assert again == first
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    assert dataset[(3, 3)] != first and dataset[(2, 4)][1] != first[1]
    assert SeededDataset(RandomSamples(), seed=12)[(2, 3)] != first
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def test_seeded_dataset_in_workers_matches_main_process():
    dataset = SeededDataset(RandomSamples(), seed=0)
    keys = [(0, 4), (0, 1), (1, 0), (1, 2), (0, 3), (2, 2)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=keys, num_workers=2)
    assert [tuple(item) for item in loader] == [dataset[key] for key in keys]
