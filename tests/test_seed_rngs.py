"""ResumableDataLoader(seed_rngs=...): seeding only the RNGs the transforms draw from gives the same batches."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset

from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader
from lightning_recipes.datamodules import DigitsDataModule


class Draws(Dataset):
    """Item i is (i, a draw from torch's global RNG, a draw from Python's)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, float]:
        return index, torch.rand(()), random.random()


def _epoch(loader) -> tuple[list[int], list[float], list[float]]:
    indices, torch_draws, python_draws = [], [], []
    for index, t, p in loader:
        indices += index.tolist()
        torch_draws += t.tolist()
        python_draws += p.tolist()
    return indices, torch_draws, python_draws


def test_seeding_torch_alone_gives_a_torch_transform_the_draws_seeding_all_three_gives():
    every = _epoch(ResumableDataLoader(Draws(), batch_size=8, shuffle=True, seed=3))
    torch_only = _epoch(ResumableDataLoader(Draws(), batch_size=8, shuffle=True, seed=3, seed_rngs=("torch",)))
    assert torch_only[:2] == every[:2]
    assert torch_only[2] != every[2]  # Python's RNG was not seeded per sample: its draws are the global stream's


def test_an_rng_left_out_is_neither_seeded_nor_restored_and_one_named_is_both():
    random.seed(11)
    expected = [random.random() for _ in range(40)]
    random.seed(11)
    _, _, python_draws = _epoch(ResumableDataLoader(Draws(), batch_size=8, seed=3, seed_rngs=("torch",)))
    assert python_draws == expected  # consumed from the global stream, in order
    random.seed(11)
    first = _epoch(ResumableDataLoader(Draws(), batch_size=8, seed=3, seed_rngs=("random",)))
    assert random.random() == expected[0]  # seeded per sample, the global state restored around each batch
    second = _epoch(ResumableDataLoader(Draws(), batch_size=8, seed=3, seed_rngs=("random",)))
    assert first[2] == second[2] and first[1] != second[1]  # Python's draws reproducible, torch's not seeded


def test_the_digits_train_loader_seeds_torch_alone_and_gives_the_batches_all_three_would():
    data = DigitsDataModule(image_size=16, batch_size=64)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.dataset.rngs == ("torch",)
    reference = ResumableDataLoader(data.train_set, batch_size=64, shuffle=True)
    for (images, labels), (ref_images, ref_labels), _ in zip(loader, reference, range(4)):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


@pytest.mark.parametrize("value", [(), "torch", ("torch", "cuda")])
def test_seed_rngs_names_at_least_one_known_rng(value):
    with pytest.raises(ValueError, match=r"seed_rngs=.*must be a non-empty tuple of \('torch', 'random', 'numpy'\)"):
        ResumableDataLoader(Draws(), batch_size=8, seed_rngs=value)
