"""Bits per byte on the held-out split of the running Python's standard library: compressors and a byte n-gram model
as anchors, and the GPT recipe's result on the same bytes.

    python benchmarks/lm_baseline.py                     # anchors + the default `python recipes/gpt.py fit`
    python benchmarks/lm_baseline.py --no-recipe         # the anchors only
    python benchmarks/lm_baseline.py -- --config recipes/configs/gpt_stdlib_long.yaml   # the recipe with these args
    python benchmarks/lm_baseline.py --path my_text/     # your own text, split as TextDataModule splits it

Anchors, each in bits per held-out byte (8 x compressed bytes / held-out bytes):
- ``gzip -9`` of the held-out bytes alone (Python's gzip module at level 9: the same DEFLATE stream as the tool);
- ``xz -9e`` of the held-out bytes alone (lzma preset 9 | PRESET_EXTREME, the tool's ``-9e``);
- ``xz -9e`` conditional on the training text: 8 x (|xz(tail + held-out)| - |xz(tail)|) / |held-out|, tail = the last
  ``--train-tail-mb`` MB of the training bytes (8 by default; xz -9e's 64 MiB window sees all of it);
- a byte n-gram model of each order up to ``--ngram-order``, counted on the training bytes, Witten-Bell interpolated
  down to a uniform distribution over the 256 bytes (the best order is picked on the held-out bytes: an optimistic
  anchor).
The recipe's figure is ``val/bpb`` of its final weights: the held-out bytes in non-overlapping windows of its context
length (the last (n - 1) mod context bytes, under one window, are not scored).
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from report import Report, config_of, quiet_lightning

from lightning_recipes.datamodules.text import TextDataModule


def compressed_bpb(held_out: bytes, train_tail: bytes) -> dict[str, float]:
    """The three compressor anchors, in bits per held-out byte."""
    xz = lambda data: len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))  # noqa: E731
    bits = 8 / len(held_out)
    return {
        "gzip -9, held-out alone": bits * len(gzip.compress(held_out, compresslevel=9, mtime=0)),
        "xz -9e, held-out alone": bits * xz(held_out),
        "xz -9e, held-out given the training tail": bits * (xz(train_tail + held_out) - xz(train_tail)),
    }


def _keys(data: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """For every position i >= order: the preceding ``order`` bytes packed into one int (base 256), and the byte."""
    context = np.zeros(len(data) - order, dtype=np.int64)
    for k in range(order):
        context = context * 256 + data[k : len(data) - order + k]
    return context, data[order:].astype(np.int64)


def _count(keys: np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    values, counts = table
    where = np.minimum(np.searchsorted(values, keys), len(values) - 1)
    return np.where(values[where] == keys, counts[where], 0)


def ngram_bpb(train: np.ndarray, held_out: np.ndarray, max_order: int) -> dict[int, float]:
    """Bits per held-out byte of Witten-Bell interpolated byte n-gram models of orders 0 to ``max_order``.

    p_n(x | c) = (C(c x) + T(c) p_{n-1}(x | c')) / (C(c) + T(c)), with C counts in the training bytes, T(c) the number
    of distinct bytes seen after c, c' the context shortened by one byte, and p_{-1} = 1/256. Where c never occurs in
    training, or the held-out text is not yet ``n`` bytes in, p_n = p_{n-1}.
    """
    probability = np.full(len(held_out), 1 / 256)
    result = {}
    for order in range(max_order + 1):
        context, following = _keys(train, order)
        pairs = np.unique(context * 256 + following, return_counts=True)
        contexts = np.unique(context, return_counts=True)
        distinct = np.unique(pairs[0] // 256, return_counts=True)  # T(c): distinct bytes after each context
        held_context, held_following = _keys(held_out, order)
        c_pair = _count(held_context * 256 + held_following, pairs)
        c_context, t_context = _count(held_context, contexts), _count(held_context, distinct)
        lower = probability[order:]
        seen = c_context > 0
        mixed = (c_pair + t_context * lower) / np.maximum(c_context + t_context, 1)
        probability = np.concatenate([probability[:order], np.where(seen, mixed, lower)])
        result[order] = float(-np.log2(probability).mean())
    return result


def run_recipe(extra: list[str], path: Optional[str], out_dir: Path) -> dict:
    """The GPT recipe's `fit` (its default config unless ``extra`` says otherwise), then val/bpb of the final weights."""
    from lightning_recipes.datamodules import TextDataModule as Data
    from lightning_recipes.recipes.common import run_cli
    from lightning_recipes.recipes.gpt import GPT

    args = ["fit", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={out_dir}", f"--trainer.logger.init_args.save_dir={out_dir}", *extra]  # fmt: skip
    if path is not None:
        args.append(f"--data.path={path}")
    start = time.perf_counter()
    cli = run_cli(GPT, "gpt_stdlib.yaml", args=args, datamodule_class=Data)
    seconds = time.perf_counter() - start
    (result,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return {"val_bpb": result["val/bpb"], "val_loss": result["val/loss"], "seconds": seconds, "args": args,
            "steps": cli.trainer.global_step, "context_length": cli.datamodule.context_length}  # fmt: skip


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="text file or folder instead of the standard library (TextDataModule's rule)")
    parser.add_argument("--glob", default="**/*.txt", help="files of --path to read")
    parser.add_argument("--train-tail-mb", type=float, default=8.0, help="MB of training text xz is conditioned on")
    parser.add_argument("--ngram-order", type=int, default=6, help="largest n-gram context, in bytes (at most 6)")
    parser.add_argument("--no-recipe", action="store_true", help="compute the anchors only")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/lm_baseline.json)")
    args = parser.parse_args(argv)
    if not 0 <= args.ngram_order <= 6:
        parser.error(f"--ngram-order {args.ngram_order}: use 0 to 6 (a context and its byte are packed in 63 bits)")

    data = TextDataModule(path=args.path, glob=args.glob, context_length=1, batch_size=1)
    data.setup()
    train, held_out = np.asarray(data.train_tokens), np.asarray(data.val_tokens)
    tail = train[-int(args.train_tail_mb * 1e6) :].tobytes() if args.train_tail_mb > 0 else b""
    report = Report("lm_baseline", 1, config_of(args, [*argv, *(["--", *extra] if extra else [])]))
    timings = {}
    started = time.perf_counter()
    anchors = compressed_bpb(held_out.tobytes(), tail)
    timings["compressors"] = time.perf_counter() - started
    for name, bpb in anchors.items():
        report.add(name, [bpb], unit="bits/byte")
    started = time.perf_counter()
    ngrams = ngram_bpb(train, held_out, args.ngram_order)
    timings["n-grams"] = time.perf_counter() - started
    for order, bpb in ngrams.items():
        report.add(f"byte n-gram, {order} bytes of context (Witten-Bell)", [bpb], unit="bits/byte")
    best = min(ngrams, key=ngrams.get)
    report.notes.append(f"best n-gram order on the held-out bytes: {best} ({ngrams[best]:.3f} bits/byte)")

    recipe = None
    if not args.no_recipe:
        with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
            recipe = run_recipe(extra, args.path, Path(tmp))
        gzip_bpb, xz_bpb = anchors["gzip -9, held-out alone"], anchors["xz -9e, held-out given the training tail"]
        report.add("recipe val/bpb (final weights)", [recipe["val_bpb"]], unit="bits/byte", goal=("<=", gzip_bpb),
                   note="goal: beat gzip -9 on the same bytes")  # fmt: skip
        report.add("recipe val/bpb / xz -9e conditional", [recipe["val_bpb"] / xz_bpb], goal=("<=", 1.0))
        report.add("recipe wall time (fit)", [recipe["seconds"]], unit="s")
        report.notes.append(
            f"recipe: {recipe['steps']} optimizer steps; its val/bpb scores the held-out bytes in windows of "
            f"{recipe['context_length']} (the last {(len(held_out) - 1) % recipe['context_length']} bytes are not scored)"
        )
    report.extra.update(corpus=data.describe(), anchor_seconds=timings, train_tail_bytes=len(tail), recipe=recipe)
    return report.finish(args.out)


if __name__ == "__main__":
    main()
