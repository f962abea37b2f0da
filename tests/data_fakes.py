"""Tiny data sets written to disk in the real formats, for the data-module and recipe-config tests."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10

from lightning_recipes.datamodules.cifar10 import CIFAR10_CLASSES

PER_TRAIN_BATCH = 4  # 5 batches -> 20 training images
N_TEST = 12


def color(i: int) -> tuple[int, int, int]:
    # Constant colours; no integer c has c / 255 == mean, so an exact 0 in a batch means RandomErasing.
    return ((10 + 7 * i) % 256, (200 - 5 * i) % 256, (40 + 11 * i) % 256)


def write_batch(path: str, first: int, n: int) -> None:
    # One row per image: 1024 red, then 1024 green, then 1024 blue bytes, as in the real files.
    data = np.stack([np.repeat(np.array(color(first + k), dtype=np.uint8), 1024) for k in range(n)])
    labels = [(first + k) % 10 for k in range(n)]
    with open(path, "wb") as f:
        pickle.dump({"batch_label": os.path.basename(path), "data": data, "labels": labels}, f)


def md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def write_cifar(data_dir, monkeypatch=None) -> str:
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(folder)
    for b in range(5):
        write_batch(os.path.join(folder, f"data_batch_{b + 1}"), 100 + b * PER_TRAIN_BATCH, PER_TRAIN_BATCH)
    write_batch(os.path.join(folder, "test_batch"), 0, N_TEST)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": N_TEST}, f)
    if monkeypatch is not None:
        # Point torchvision's own md5 check at the generated files (real files keep the real sums).
        md5_of = lambda name: md5(os.path.join(folder, name))  # noqa: E731
        monkeypatch.setattr(CIFAR10, "train_list", [[n, md5_of(n)] for n, _ in CIFAR10.train_list])
        monkeypatch.setattr(CIFAR10, "test_list", [[n, md5_of(n)] for n, _ in CIFAR10.test_list])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5_of("batches.meta")})
    return folder


COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
SIZES = dict(train_crop_size=16, val_resize_size=20, val_crop_size=16)


def write_image(path, color, size=(40, 30), mode="RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", size, color)
    # A gradient on the left half makes crops and flips visible in the pixels.
    for x in range(size[0] // 2):
        for y in range(size[1]):
            image.putpixel((x, y), (x * 6, y * 8, 100))
    image.convert(mode).save(path)


def write_tree(root, per_class=(3, 2)) -> str:
    for split, n in zip(("train", "val"), per_class):
        for name, color in COLORS.items():
            for i in range(n):
                ext = ".png" if i % 2 == 0 else ".JPG"  # extensions match in any case
                write_image(os.path.join(root, split, name, f"{i}{ext}"), color)
    return str(root)




def write_text_folder(root, files: int = 40, lines: int = 30) -> str:
    """A folder of small made-up Python-like text files (deterministic), enough for both splits of TextDataModule."""
    for i in range(files):
        path = os.path.join(root, f"pkg{i % 3}", f"module_{i}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(lines))
    return str(root)


def write_token_bins(root, vocab_size: int = 50257, train_tokens: int = 4096, val_tokens: int = 1024) -> str:
    """train.bin / val.bin in nanoGPT's format (uint16 ids, no header), ids below ``vocab_size``."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train_tokens), ("val", val_tokens)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(os.path.join(root, f"{name}.bin"))
    return str(root)
