"""CIFAR10DataModule on a tiny CIFAR-10 written in the real pickle format, read by torchvision's own loader."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from jsonargparse import ArgumentParser
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from data_fakes import N_TEST, PER_TRAIN_BATCH, color, write_cifar
from lightning_recipes.datamodules.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule

@pytest.fixture
def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"network access: download_and_extract_archive{args}")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch, no_network) -> str:
    write_cifar(tmp_path, monkeypatch)
    return str(tmp_path)


def test_shape_attributes_are_known_before_setup(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    assert dm.classes[0] == "airplane" and dm.classes[9] == "truck"
    assert dm.hparams["data_dir"] == str(tmp_path / "nowhere") and dm.hparams["batch_size"] == 128


def test_val_batches_are_exactly_normalized_and_in_order(cifar_dir):
    dm = CIFAR10DataModule(data_dir=cifar_dir, batch_size=5, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_TRAIN_BATCH and len(dm.val_set) == N_TEST
    assert dm.test_set is dm.val_set  # val = test = the official test batch
    assert dm.val_set.classes == list(CIFAR10_CLASSES)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3, 4]
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    for i in range(5):
        expected = (torch.tensor(color(i), dtype=torch.float32) / 255 - mean) / std
        torch.testing.assert_close(images[i], expected[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-6)
    assert [len(b[1]) for b in dm.test_dataloader()] == [5, 5, 2]


def test_train_batches_are_augmented_and_labelled(cifar_dir):
    torch.manual_seed(0)
    dm = CIFAR10DataModule(data_dir=cifar_dir, batch_size=20, num_workers=0)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.float32
    assert sorted(labels.tolist()) == sorted((100 + k) % 10 for k in range(20))
    # RandomCrop(padding=4) pads with black, which normalizes to -mean/std: some crops show that border.
    border = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD))[:, None, None]
    assert any(torch.isclose(img, border, atol=1e-6).all(0).any() for img in images)
    assert not (images == 0).any()  # no erasing unless asked


def test_random_erasing_and_ta_wide_are_added_to_train_only(cifar_dir):
    torch.manual_seed(0)
    dm = CIFAR10DataModule(data_dir=cifar_dir, auto_augment="ta_wide", random_erasing=1.0, batch_size=20, num_workers=0)
    dm.setup("fit")
    train_steps = [type(t) for t in dm.train_set.transform.transforms]
    assert v2.TrivialAugmentWide in train_steps and train_steps[-1] is v2.RandomErasing
    assert dm.train_set.transform.transforms[-1].p == 1.0
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (20, 3, 32, 32)
    # Erased pixels are 0 after Normalize, and no colour of the data set normalizes to 0.
    assert all((img == 0).all(0).sum() >= 10 for img in images)  # a box of >= 2% of the 32x32 pixels
    val_images, _ = next(iter(dm.val_dataloader()))
    assert not (val_images == 0).any()
    assert [type(t) for t in dm.val_set.transform.transforms] == [v2.ToImage, v2.ToDtype, v2.Normalize]


def test_loaders_work_with_worker_processes(cifar_dir):
    dm = CIFAR10DataModule(data_dir=cifar_dir, batch_size=4, num_workers=2)
    dm.setup("fit")
    assert dm.persistent_workers
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    images, labels = next(iter(dm.val_dataloader()))
    assert labels.tolist() == [0, 1, 2, 3]


def test_test_stage_does_not_read_the_training_batches(cifar_dir):
    dm = CIFAR10DataModule(data_dir=cifar_dir, num_workers=0)
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == N_TEST


def test_missing_files_fail_in_prepare_data_and_setup_without_network(tmp_path, no_network):
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    expected = os.path.join(str(tmp_path), "cifar-10-batches-py")
    for call in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError, match=rf"{expected}.*data_batch_1.*--data\.download true"):
            call()


def test_one_missing_file_is_named(tmp_path, no_network):
    folder = write_cifar(tmp_path)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_3\. Pass --data\.download true"):
        CIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()


def test_files_failing_the_md5_check_are_rejected(tmp_path, no_network):
    # Generated files do not carry the real md5 sums: torchvision's integrity check must still run.
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    dm.prepare_data()  # existence only
    with pytest.raises(RuntimeError, match=r"fail torchvision's md5 check.*--data\.download true"):
        dm.setup("fit")


def test_download_true_fetches_the_archive_into_data_dir(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, download_root, filename))
        write_cifar(download_root, monkeypatch)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True, num_workers=0)
    dm.prepare_data()
    assert calls == [(CIFAR10.url, str(tmp_path), "cifar-10-python.tar.gz")]
    dm.prepare_data()  # files now verified: no second download
    assert len(calls) == 1
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_TRAIN_BATCH


@pytest.mark.parametrize("value", [-0.1, 1.5, True])
def test_random_erasing_outside_0_1_is_rejected(value):
    with pytest.raises(ValueError, match=rf"random_erasing={value!r} is invalid: it is a probability in \[0, 1\]"):
        CIFAR10DataModule(random_erasing=value)


def test_cli_parses_the_signature(tmp_path):
    parser = ArgumentParser()
    parser.add_class_arguments(CIFAR10DataModule, "data")
    cfg = parser.parse_args(
        ["--data.data_dir", str(tmp_path), "--data.download", "true", "--data.random_erasing", "0.25"]
    )
    dm = CIFAR10DataModule(**cfg.data)
    assert dm.download is True and dm.random_erasing == 0.25 and dm.batch_size == 128
