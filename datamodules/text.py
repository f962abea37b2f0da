"""Text for language models: this Python's standard library as bytes (the offline default), your own text
files, or pre-tokenised ``train.bin`` / ``val.bin`` token files."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader
from lightning_recipes.datamodules.base import check_number

#: Folders of the standard library left out of the default corpus: test suites, IDLE, installed packages.
STDLIB_EXCLUDED = frozenset({"test", "tests", "idlelib", "site-packages"})


def stdlib_files(root: Optional[str] = None) -> list[tuple[str, Path]]:
    """The ``*.py`` files of the standard library outside ``STDLIB_EXCLUDED`` folders: (relative path, path), sorted."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(root_path):
        subfolders[:] = [s for s in subfolders if s not in STDLIB_EXCLUDED]  # never descend into them
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(root_path).as_posix(), path))
    return sorted(found)


def is_held_out(relative_path: str, val_percent: int) -> bool:
    """The split rule: a file is held out when ``int(sha256(relative path), 16) % 100 < val_percent``.

    It depends on the file's path alone, so a file never moves between the splits when others are added.
    """
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < val_percent


class TokenWindows(Dataset):
    """Windows of ``context_length + 1`` tokens from one token array, as (inputs, next-token targets).

    Index ``i`` is the slot of tokens ``[i*T, (i+1)*T)``, ``T = context_length``: one epoch visits every slot once.
    With ``random_offset`` (training) the window starts at a random place inside its slot, drawn from torch's global
    RNG, so over the epochs every token position starts windows; without (validation) the windows are fixed and do
    not overlap. The training loader (a ``ResumableDataLoader``) seeds that RNG per window from (seed, epoch, position
    in the epoch), so a run resumed mid-epoch draws the very same windows.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, *, random_offset: bool) -> None:
        self.tokens, self.context_length, self.random_offset = tokens, context_length, random_offset

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.context_length
        start = index * length
        if self.random_offset:
            start = min(start + int(torch.randint(length, ())), len(self.tokens) - length - 1)
        window = torch.from_numpy(self.tokens[start : start + length + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        # A memmap would be pickled as a full in-memory copy into every spawned worker: reopen it there instead.
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r")
        self.__dict__.update(state)


class TextDataModule(LightningDataModule):
    """Next-token windows for a language model, from one of three sources (``path``):

    - **None (default)**: the running Python's standard library, ``sysconfig.get_paths()["stdlib"]``, its ``*.py``
      files outside folders named ``test``, ``tests``, ``idlelib``, ``site-packages`` (674 files, 11,354,162 bytes on
      CPython 3.11.7). Offline, real, different on every Python version: ``python_version``, ``file_count``,
      ``byte_count`` and ``sha256`` say which corpus a figure was measured on.
    - **a text file or folder**: the files under the folder matching ``glob``, or the one file.
    - **a folder with ``train.bin`` and ``val.bin``**: uint16 token ids (nanoGPT / llm.c's format, no header),
      memory-mapped, from your own tokenizer; give its ``vocab_size``.

    Text is read as bytes: the tokens are the 256 byte values (no tokenizer), so ``val/loss / ln 2`` is exactly bits
    per byte. Files are split whole, never inside one: a file is held out when ``int(sha256(its path relative to
    the folder), 16) % 100 < val_percent`` (a single file: its last ``val_percent`` % of bytes). Each split is its
    files' bytes concatenated in sorted path order. ``sha256`` hashes, file by file in that order, the relative path,
    a NUL byte, the content's length in decimal, a NUL byte and the content (not computed for ``.bin`` files).
    ``val``, ``test`` and the default sampling prompt all use the held-out split.
    """

    def __init__(
        self,
        *,
        path: Optional[str] = None,
        glob: str = "**/*.txt",
        vocab_size: Optional[int] = None,
        context_length: int = 128,
        batch_size: int = 32,
        val_percent: int = 5,
        prompt: Optional[str] = None,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
    ) -> None:
        """
        Args:
            path: None for the standard library; else a text file, a folder of text files, or a folder holding
                ``train.bin`` and ``val.bin``.
            glob: which files of a text folder to read (``pathlib`` glob, ``**`` recurses).
            vocab_size: number of token ids of ``train.bin`` / ``val.bin`` (e.g. 50257 for GPT-2's tokenizer);
                text is bytes, vocabulary 256, and takes no value here.
            context_length: tokens per window, the model's context (linked into the model by the CLI).
            batch_size: windows per step, per process.
            val_percent: share of the files held out, in percent (1 to 99); 5 for the published figures.
            prompt: what ``predict`` and the end of ``fit`` continue: text, or for ``.bin`` data token ids separated
                by spaces; None = the first 16 tokens of the held-out split.
            num_workers: DataLoader worker processes; 0 is fastest for in-memory bytes.
            pin_memory: page-lock batches for faster host-to-GPU copies; None = only when CUDA is present.
        """
        super().__init__()
        check_number("context_length", context_length, "use an int >= 1", option="--data.context_length", integer=True, at_least=1)
        check_number("batch_size", batch_size, "use an int >= 1", option="--data.batch_size", integer=True, at_least=1)
        check_number("val_percent", val_percent, "use an int from 1 to 99", option="--data.val_percent", integer=True, at_least=1, at_most=99)
        check_number("num_workers", num_workers, "use 0 (load in the main process) or a positive int", option="--data.num_workers", integer=True, at_least=0)
        self.path, self.glob, self.context_length, self.batch_size = path, glob, context_length, batch_size
        self.val_percent, self.prompt, self.num_workers = val_percent, prompt, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.python_version = platform.python_version()
        self.sha256: Optional[str] = None
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        # vocab_size: None here means "bytes"; the model's (linked) vocab_size says the number.
        self.save_hyperparameters(ignore=["vocab_size"])

        # Everything below reads names and sizes only, so that a bad input fails before any process starts.
        self.tokens_are_bytes = not (path is not None and Path(path, "train.bin").is_file())
        if self.tokens_are_bytes:
            if vocab_size is not None:
                raise ValueError(
                    f"vocab_size={vocab_size!r} is for train.bin / val.bin token files, but {path or 'the standard library'} "
                    "is read as bytes (vocabulary 256): drop --data.vocab_size."
                )
            self.vocab_size = 256
            self.files, self.held_out = self._text_files()
            sizes = {rel: p.stat().st_size for rel, p in self.files}
            self.byte_count = sum(sizes.values())
            if self.byte_count == 0:
                raise ValueError(f"--data.path={self._where()} holds only empty files ({len(self.files)}): give text.")
            if len(self.files) == 1:
                val_size = math.ceil(self.byte_count * val_percent / 100)
            else:
                val_size = sum(sizes[rel] for rel in self.held_out)
            train_size = self.byte_count - val_size
        else:
            if vocab_size is None:
                raise ValueError(
                    f"--data.path={path} holds train.bin: give the vocabulary of its tokenizer, e.g. --data.vocab_size 50257 "
                    "for GPT-2's."
                )
            check_number("vocab_size", vocab_size, "uint16 token files hold ids 0 to 65535: use 2 to 65536", option="--data.vocab_size", integer=True, at_least=2, at_most=65536)
            self.vocab_size = vocab_size
            self.files, self.held_out = [], set()
            train_size, val_size = (self._bin_tokens(Path(path, f"{split}.bin")) for split in ("train", "val"))
            self.byte_count = 2 * (train_size + val_size)
        self.file_count = len(self.files)
        for split, size in (("held-out", val_size), ("training", train_size)):
            if size < context_length + 1:
                raise ValueError(
                    f"the {split} split of {self._where()} has {size} tokens, fewer than one window of context_length + 1 = "
                    f"{context_length + 1}: lower --data.context_length to at most {max(size - 1, 0)}, or give more text"
                    + (" (more files, or a different --data.val_percent)." if self.tokens_are_bytes else ".")
                )
        self.split_tokens = {"train": train_size, "val": val_size}
        windows = (train_size - 1) // context_length
        if windows < batch_size:
            raise ValueError(
                f"the training split of {self._where()} has {windows} windows of context_length={context_length} tokens, "
                f"fewer than one batch: lower --data.batch_size={batch_size} to at most {windows}, or give more text."
            )

    def _where(self) -> str:
        return self.path if self.path is not None else f"the standard library ({sysconfig.get_paths()['stdlib']})"

    def _text_files(self) -> tuple[list[tuple[str, Path]], set[str]]:
        if self.path is None:
            files = stdlib_files()
        else:
            root = Path(self.path)
            if root.is_file():
                return [(root.name, root)], set()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"--data.path={self.path} does not exist: give a text file, a folder of text files, or a folder "
                    "holding train.bin and val.bin (or leave --data.path out for the standard library)."
                )
            files = sorted((p.relative_to(root).as_posix(), p) for p in root.glob(self.glob) if p.is_file())
            if not files:
                raise FileNotFoundError(
                    f"--data.path={self.path} has no file matching --data.glob={self.glob!r}: put text files there, or "
                    "change --data.glob (e.g. '**/*.md', '**/*' for every file)."
                )
        return files, {rel for rel, _ in files if is_held_out(rel, self.val_percent)}

    def _bin_tokens(self, path: Path) -> int:
        if not path.is_file():
            raise FileNotFoundError(f"--data.path={self.path} has train.bin but no {path.name}: write both splits.")
        size = path.stat().st_size
        if size % 2:
            raise ValueError(
                f"{path} has {size} bytes, not a whole number of uint16 tokens: it is truncated or not a uint16 token "
                "file (write it with np.array(ids, dtype=np.uint16).tofile(path))."
            )
        return size // 2

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tokens is not None:
            return
        if self.tokens_are_bytes:
            digest, parts = hashlib.sha256(), {"train": [], "val": []}
            for rel, path in self.files:
                content = path.read_bytes()
                digest.update(rel.encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
                parts["val" if rel in self.held_out else "train"].append(content)
            data = {split: np.frombuffer(b"".join(chunks), dtype=np.uint8) for split, chunks in parts.items()}
            if len(self.files) == 1:
                cut = len(data["train"]) - self.split_tokens["val"]
                data = {"train": data["train"][:cut], "val": data["train"][cut:]}
            self.sha256 = digest.hexdigest()
            self.train_tokens, self.val_tokens = data["train"], data["val"]
        else:
            self.train_tokens, self.val_tokens = (
                np.memmap(Path(self.path, f"{split}.bin"), dtype=np.uint16, mode="r") for split in ("train", "val")
            )
            for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
                largest = int(tokens.max())  # one pass over the file; an id past the vocabulary would index garbage
                if largest >= self.vocab_size:
                    raise ValueError(
                        f"{split}.bin holds token id {largest}, but --data.vocab_size={self.vocab_size}: give the "
                        f"tokenizer's vocabulary (at least {largest + 1})."
                    )
        trainer = getattr(self, "trainer", None)
        for logger in trainer.loggers if trainer is not None else []:
            logger.log_hyperparams({"corpus": self.describe()})  # lands in the run's hparams.yaml
        rank_zero_info(f"TextDataModule: {self.describe()}")

    def describe(self) -> dict:
        """Which corpus this is: what every reported figure names."""
        return {
            "source": self._where(),
            "python_version": self.python_version,
            "file_count": self.file_count,
            "byte_count": self.byte_count,
            "sha256": self.sha256,
            "train_tokens": self.split_tokens["train"],
            "val_tokens": self.split_tokens["val"],
            "vocab_size": self.vocab_size,
        }

    # ----------------------------------------------------------------------------------------- prompt / text

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a (1, n) token tensor: its UTF-8 bytes, or for ``.bin`` data the ids written in it."""
        if self.tokens_are_bytes:
            ids = list(text.encode())
        else:
            try:
                ids = [int(word) for word in text.split()]
            except ValueError:
                ids = [-1]
            if not ids or not all(0 <= i < self.vocab_size for i in ids):
                raise ValueError(
                    f"prompt={text!r} is not a list of token ids: with .bin data give ids from 0 to {self.vocab_size - 1} "
                    "separated by spaces (--data.prompt '50256')."
                )
        if not ids:
            raise ValueError("prompt='' is empty: give at least one character (--data.prompt).")
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        ids = tokens.flatten().tolist()
        return bytes(ids).decode("utf-8", errors="replace") if self.tokens_are_bytes else " ".join(map(str, ids))

    def prompt_tokens(self) -> torch.Tensor:
        if self.prompt is not None:
            return self.encode(self.prompt)
        self.setup()
        return torch.from_numpy(self.val_tokens[: min(16, self.context_length)].astype(np.int64))[None]

    # ----------------------------------------------------------------------------------------------- loaders

    def _loader(self, tokens: Optional[np.ndarray], *, train: bool) -> DataLoader:
        if tokens is None:
            raise RuntimeError("TextDataModule.setup() has not run yet; call setup() first.")
        # Training: a ResumableDataLoader (as the image data modules), whose position in the epoch and seed are its
        # own state_dict, saved in every checkpoint: a mid-epoch resume continues with the same windows. Under
        # overfit_batches Lightning swaps in a SequentialSampler, which only a plain DataLoader accepts.
        resumable = train and not (self.trainer is not None and self.trainer.overfit_batches > 0)
        return (ResumableDataLoader if resumable else DataLoader)(
            TokenWindows(tokens, self.context_length, random_offset=train),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,  # equal batches: every optimizer step sees batch_size x context_length tokens
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tokens, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, train=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader([self.prompt_tokens()[0]], batch_size=1)
