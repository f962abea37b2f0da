"""ImageFolderDataModule on a few tiny PNG/JPEG files written into train/ and val/ class folders."""

from __future__ import annotations

import os
import re
from argparse import ArgumentError

import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torchvision.transforms import v2

from data_fakes import COLORS, SIZES, write_image, write_tree
from lightning_recipes.datamodules.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule

@pytest.fixture
def root(tmp_path) -> str:
    return write_tree(tmp_path)


def test_classes_and_shape_attributes_are_known_before_setup(root):
    dm = ImageFolderDataModule(root=root, train_crop_size=16, val_resize_size=40, val_crop_size=32)
    assert dm.classes == ["cat", "dog", "emu"] and dm.num_classes == 3
    assert dm.in_channels == 3 and dm.image_size == 32  # the val crop: the size evaluated and predicted on
    assert dm.train_set is None and dm.hparams["root"] == root and dm.hparams["batch_size"] == 64


def test_batches_have_the_crop_size_and_the_folder_labels(root):
    dm = ImageFolderDataModule(
        root=root, train_crop_size=24, val_resize_size=20, val_crop_size=16, batch_size=4, num_workers=0
    )
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6 and dm.test_set is dm.val_set
    assert dm.train_set.classes == dm.val_set.classes == dm.classes
    train_images, train_labels = next(iter(dm.train_dataloader()))
    assert train_images.shape == (4, 3, 24, 24) and train_images.dtype == torch.float32
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 16, 16) and val_images.dtype == torch.float32
    assert val_labels.tolist() == [0, 0, 1, 1]  # sorted folders: cat=0, dog=1, emu=2
    assert sorted(label for _, label in dm.train_set.samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_val_transform_is_deterministic_and_exactly_normalized(tmp_path):
    # A uniform image stays uniform through Resize + CenterCrop: every pixel is (c/255 - mean) / std.
    for split in ("train", "val"):
        for name, color in COLORS.items():
            os.makedirs(tmp_path / split / name)
            Image.new("RGB", (50, 37), color).save(tmp_path / split / name / "a.png")
    dm = ImageFolderDataModule(root=str(tmp_path), **SIZES, batch_size=3, num_workers=0)
    dm.setup("validate")
    first, labels = next(iter(dm.val_dataloader()))
    second, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(first, second)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for image, label in zip(first, labels.tolist()):
        color = COLORS[dm.classes[label]]
        expected = (torch.tensor(color, dtype=torch.float32) / 255 - mean) / std
        torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-6)


def test_val_is_repeatable_on_textured_images_but_train_is_random(root):
    dm = ImageFolderDataModule(root=root, **SIZES, num_workers=0)
    dm.setup("fit")
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    torch.manual_seed(0)
    crops = [dm.train_set[0][0] for _ in range(5)]
    assert not all(torch.equal(crops[0], c) for c in crops[1:])


def test_grey_and_rgba_files_are_read_as_rgb(tmp_path):
    root = write_tree(tmp_path)
    write_image(os.path.join(root, "val", "cat", "grey.png"), (0, 0, 0), mode="L")
    write_image(os.path.join(root, "val", "cat", "alpha.png"), (0, 0, 0), mode="RGBA")
    dm = ImageFolderDataModule(root=root, **SIZES, batch_size=4, num_workers=0)
    dm.setup("validate")
    images, _ = next(iter(dm.val_dataloader()))  # cat's 4 files, grey and RGBA among them
    assert images.shape == (4, 3, 16, 16)


def test_augmentation_switches_change_the_train_transform_only(root):
    dm = ImageFolderDataModule(root=root, **SIZES, hflip=False, auto_augment="ta_wide", random_erasing=0.5)
    steps = [type(t) for t in dm.train_transform().transforms]
    assert steps == [
        v2.RandomResizedCrop, v2.TrivialAugmentWide, v2.ToImage, v2.ToDtype, v2.Normalize, v2.RandomErasing
    ]
    assert dm.train_transform().transforms[-1].p == 0.5
    default = ImageFolderDataModule(root=root, **SIZES)
    assert [type(t) for t in default.train_transform().transforms] == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToImage, v2.ToDtype, v2.Normalize
    ]
    eval_steps = [type(t) for t in dm.eval_transform().transforms]
    assert eval_steps == [v2.Resize, v2.CenterCrop, v2.ToImage, v2.ToDtype, v2.Normalize]


def test_random_erasing_zeroes_a_box_of_every_train_image(root):
    torch.manual_seed(0)
    dm = ImageFolderDataModule(root=root, **SIZES, random_erasing=1.0, batch_size=9, num_workers=0)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert all((image == 0).all(0).sum() >= 4 for image in images)


def test_loaders_work_with_worker_processes(root):
    dm = ImageFolderDataModule(root=root, **SIZES, batch_size=3, num_workers=2)
    dm.setup("fit")
    assert dm.persistent_workers
    assert next(iter(dm.train_dataloader()))[0].shape == (3, 3, 16, 16)
    assert next(iter(dm.val_dataloader()))[1].tolist() == [0, 0, 1]


def test_test_stage_reads_only_val(root):
    dm = ImageFolderDataModule(root=root, **SIZES, num_workers=0)
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_dataloader().dataset) == 6


def test_nested_folders_and_custom_normalization(tmp_path):
    root = write_tree(tmp_path)
    write_image(os.path.join(root, "train", "emu", "2024", "x.jpeg"), (0, 0, 0))
    dm = ImageFolderDataModule(root=root, **SIZES, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.train_set) == 10  # a subfolder of a class is not a class
    image, _ = dm.val_set[0]
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_missing_root_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"root='{re.escape(missing)}' is not a folder: point --data\.root at"):
        ImageFolderDataModule(root=missing)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder_is_named(tmp_path, split):
    other = {"train": "val", "val": "train"}[split]
    write_image(str(tmp_path / other / "cat" / "a.png"), (1, 2, 3))
    missing = re.escape(str(tmp_path / split))
    with pytest.raises(FileNotFoundError, match=rf"'{missing}' is missing: root=.* must hold train/ and val/"):
        ImageFolderDataModule(root=str(tmp_path))


def test_split_without_class_folders_is_rejected(tmp_path):
    os.makedirs(tmp_path / "val")
    write_image(str(tmp_path / "train" / "loose.png"), (1, 2, 3))  # an image, but no class folder
    train = re.escape(str(tmp_path / "train"))
    with pytest.raises(FileNotFoundError, match=rf"'{train}' has no class folders: put each class's images in"):
        ImageFolderDataModule(root=str(tmp_path))


def test_different_classes_in_train_and_val_are_listed(tmp_path):
    root = write_tree(tmp_path)
    os.rename(os.path.join(root, "val", "emu"), os.path.join(root, "val", "eagle"))
    write_image(os.path.join(root, "val", "fox", "a.png"), (1, 2, 3))
    with pytest.raises(ValueError, match=r"only in train: \['emu'\], only in val: \['eagle', 'fox'\]"):
        ImageFolderDataModule(root=root)


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folder_without_images_is_named(tmp_path, split):
    root = write_tree(tmp_path)
    for split_name in ("train", "val"):
        os.makedirs(os.path.join(root, split_name, ".ipynb_checkpoints"))
    with open(os.path.join(root, "train", ".ipynb_checkpoints", "notes.txt"), "w") as f:
        f.write("not an image")
    if split == "val":  # give train's copy an image, so the val one is the empty folder
        write_image(os.path.join(root, "train", ".ipynb_checkpoints", "a.png"), (1, 2, 3))
    empty = os.path.join(root, split, ".ipynb_checkpoints")
    pattern = rf"class folder '{re.escape(empty)}' holds no image \(\.jpg .*\): add images or remove the folder"
    with pytest.raises(FileNotFoundError, match=pattern):
        ImageFolderDataModule(root=root)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_crop_size": 0}, r"train_crop_size=0 is invalid: it must be a positive int"),
        ({"val_resize_size": 2.5}, r"val_resize_size=2\.5 is invalid: it must be a positive int"),
        ({"val_crop_size": 300}, r"val_crop_size=300 is invalid with val_resize_size=256: the crop must not exceed"),
        ({"random_erasing": 1.5}, r"random_erasing=1\.5 is invalid: it is a probability in \[0, 1\]"),
        ({"mean": (0.5, 0.5)}, r"mean=\(0\.5, 0\.5\) is invalid: give 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, r"std=\(0\.5, 0\.0, 0\.5\) is invalid: give 3 positive values"),
        ({"batch_size": 0}, r"batch_size=0 is invalid"),
    ],
)
def test_invalid_arguments_are_rejected(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=root, **kwargs)


def test_cli_requires_root_and_parses_tuples(root):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageFolderDataModule, "data")
    with pytest.raises(ArgumentError, match="required: data.root"):
        parser.parse_args([])
    cfg = parser.parse_args(["--data.root", root, "--data.mean", "[0.5, 0.4, 0.3]", "--data.val_crop_size", "192"])
    dm = ImageFolderDataModule(**cfg.data)
    assert dm.mean == (0.5, 0.4, 0.3) and dm.image_size == 192 and dm.num_classes == 3
