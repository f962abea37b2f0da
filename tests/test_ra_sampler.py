"""ResumableDataLoader(repeated_augmentations=k): torchvision's RASampler order, resumable mid-epoch, copies augmented apart."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader


class Indices(Dataset):
    """Item i is (i, a draw from torch's global RNG): the draw shows the augmentation seed the sample got."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(())


def reference_ra_sampler(size: int, num_replicas: int, rank: int, seed: int, epoch: int, reps: int) -> list[int]:
    """torchvision references/classification/sampler.py RASampler.__iter__ (shuffle=True), written out."""
    num_samples = int(math.ceil(size * float(reps) / num_replicas))
    total_size = num_samples * num_replicas
    num_selected = int(math.floor(size // 256 * 256 / num_replicas))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(size, generator=g).tolist()
    indices = [ele for ele in indices for _ in range(reps)]
    indices += indices[: (total_size - len(indices))]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices[:num_selected]


def _loader(size: int = 1000, *, num_replicas: int = 1, rank: int = 0, reps: int = 3, batch_size: int = 8):
    return ResumableDataLoader(Indices(size), batch_size=batch_size, shuffle=True, seed=7, num_replicas=num_replicas,
                               rank=rank, repeated_augmentations=reps)  # fmt: skip


def _stream(loader) -> tuple[list[int], list[float]]:
    indices, draws = [], []
    for index, draw in loader:
        indices += index.tolist()
        draws += draw.tolist()
    return indices, draws


@pytest.mark.parametrize("num_replicas", [2, 3])
@pytest.mark.parametrize("reps", [3, 4])
def test_the_order_is_torchvisions_ra_sampler_on_every_rank_and_epoch(num_replicas, reps):
    selected = 1000 // 256 * 256 // num_replicas  # 768 samples over all ranks, whatever reps is
    for epoch in (0, 1):
        counts: Counter = Counter()
        for rank in range(num_replicas):
            loader = _loader(num_replicas=num_replicas, rank=rank, reps=reps)
            loader.sampler.set_epoch(epoch)
            indices, _ = _stream(loader)
            assert indices == reference_ra_sampler(1000, num_replicas, rank, 7, epoch, reps)
            assert len(indices) == len(loader.sampler) == selected
            assert len(loader) == math.ceil(selected / 8)
            counts.update(indices)
        # Fewer distinct images per epoch: about 768 / reps, each at most reps times over all ranks.
        assert max(counts.values()) == reps and len(counts) == math.ceil(selected * num_replicas / reps)


def test_the_copies_of_an_image_go_to_consecutive_ranks():
    # 4 ranks, 4 copies: every image of the epoch sits once on each rank, at the same step.
    streams = [_stream(_loader(num_replicas=4, rank=rank, reps=4))[0] for rank in range(4)]
    assert streams[0] == streams[1] == streams[2] == streams[3]
    assert len(set(streams[0])) == len(streams[0]) == 192


def test_the_copies_are_augmented_differently_and_the_draws_are_reproducible():
    indices, draws = _stream(_loader(reps=3))
    assert indices[:6] == [indices[0]] * 3 + [indices[3]] * 3  # one process: the copies come in a row
    # Per-sample seeds follow the position in the epoch, not the index: three copies, three different draws.
    assert len(set(draws)) == len(draws) == 768
    assert _stream(_loader(reps=3)) == (indices, draws)


def test_a_mid_epoch_resume_gives_exactly_the_remaining_batches():
    uninterrupted = _loader(num_replicas=2, rank=1, reps=3)
    uninterrupted.sampler.set_epoch(2)
    batches = list(uninterrupted)
    first = _loader(num_replicas=2, rank=1, reps=3)
    first.sampler.set_epoch(2)
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    assert state == {"seed": 7, "epoch": 2, "batches": 5}
    resumed = _loader(num_replicas=2, rank=1, reps=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(batches) - 5 == 43
    for (index, draw), (expected_index, expected_draw) in zip(rest, batches[5:]):
        assert torch.equal(index, expected_index) and torch.equal(draw, expected_draw)


def test_without_repetitions_the_order_is_distributed_samplers():
    from torch.utils.data import DistributedSampler

    loader = _loader(num_replicas=3, rank=2, reps=1)
    reference = DistributedSampler(Indices(1000), num_replicas=3, rank=2, shuffle=True, seed=7)
    assert _stream(loader)[0] == list(reference) and len(loader.sampler) == 334


@pytest.mark.parametrize("reps", [0, -1, 2.0, True, "3"])
def test_repeated_augmentations_must_be_an_int_of_at_least_1(reps):
    with pytest.raises(ValueError, match=r"ResumableDataLoader\(repeated_augmentations=.*\): must be an integer >= 1"):
        _loader(reps=reps)


def test_a_dataset_that_gives_an_empty_epoch_is_refused():
    with pytest.raises(ValueError, match=r"repeated_augmentations=3\): a dataset of 255 samples gives an empty epoch on"
                                         r" 1 process\(es\).* use at least 256 samples per process"):  # fmt: skip
        _loader(255)
    loader = ResumableDataLoader(Indices(300), batch_size=4, num_replicas=None, repeated_augmentations=2)
    assert len(loader) == 64  # 256 samples on the one process
    with pytest.raises(ValueError, match=r"a dataset of 300 samples gives an empty epoch on 512 process\(es\)"):
        len(ResumableDataLoader(Indices(300), batch_size=4, num_replicas=512, rank=0, repeated_augmentations=2))
