"""Token-weighted vs micro-batch-mean gradient accumulation on ragged windows: the byte-level GPT on the stdlib.

    python experiments/token_accumulation.py            # about 20 minutes on 2 quiet CPU cores (9 runs of 2 min)
    python experiments/token_accumulation.py --help     # the size options

Claim (issue 12 item 5; Hugging Face's 2024 "gradient accumulation bug"): a language model's loss is the mean over
*tokens*. When micro-batches carry different numbers of loss-bearing tokens (padding, ragged documents), the mean of
k micro-batch means (``GradientAccumulation(weight_by="samples")``, and Lightning's own ``accumulate_grad_batches``)
is not the gradient of one large batch: it gives the tokens of a sparse micro-batch more weight. Weighting every
micro-batch by its token count (``weight_by="tokens"``) is the large batch up to rounding. Does the difference matter
for the final model?

Ragged windows. The recipe's ``GPT`` (``recipes/gpt.py``, ``recipes/configs/gpt_stdlib.yaml``: 4 x 128, context 128,
AdamW 2e-3, betas (0.9, 0.95), wd 0.1, warmup 5 % + cosine to 0.1x, clipping at 1.0) on ``TextDataModule``'s
stdlib windows, but each training window n gets a length ``L_n`` drawn uniformly from 1 to the context (128) and its
targets from ``L_n`` on set to -100, ``F.cross_entropy``'s ``ignore_index``: the window is then a document of
``L_n`` tokens followed by padding (attention is causal, so the bytes after ``L_n`` change nothing before it). The
uniform draw is the plainest ragged batch: half the targets are padding on average and a micro-batch of 8 windows
holds 516 +- 104 tokens (a 20 % spread); it is stated here so that a reader can scale the effect to their own data
(a heavier tail, or micro-batches of 1 document, spread the counts more). The lengths are a fixed table drawn from
``sha256("ragged-lengths-<seed>")`` and indexed by the window's position in the run, applied in the module's
``on_after_batch_transfer`` (before any callback sees the batch), so every mode of one seed trains on the same
windows with the same masks: the script checks it (inputs and targets of every micro-batch ``torch.equal``).

Method. (1) Gradient at initialisation, float64 and float32, on the first optimizer window of the real data: the
reference is one batch of k x B ragged windows whose loss is the mean over all its loss-bearing tokens (the recipe's
own loss); each mode accumulates the same windows as k micro-batches of B with ``GradientAccumulation(
global_batch_size=k*B, weight_by=...)``. The gradient is read in ``on_before_optimizer_step`` (before clipping); the
same initial weights and the same windows (checked). Reported: max |Δg|, ||Δg|| / ||g||, cosine to the reference.
(2) Training: each mode x ``--seeds`` for ``--steps`` optimizer steps of k micro-batches of B windows, then
``val/bpb`` on the first ``--val-windows`` unmasked held-out windows (1,280 x 128 bytes: the 163,840 bytes the GPT
grids' ``limit_val_batches: 40`` of 32 read, the same every time), and the training loss per token (the mean over
all loss-bearing tokens of the last ``--last-steps`` windows; every run is measured by the same per-token rule).
The control: one batch of k x B windows per step, no accumulation, the same windows and masks: ``tokens`` computes
its gradient up to float32 rounding, so ``tokens - one batch`` is how far rounding alone moves the final figures in
these runs, the noise floor against which ``tokens - samples`` is read. Mean +- sample std over seeds, and the
paired per-seed differences. ``--gradient-micro-batches 1`` (default) adds the gradient of k x B micro-batches of one
window each: one document per micro-batch, where the mean of micro-batch means is the per-document mean of the 2024
bug. One torch thread (``--threads``) by default.

Writes ``<out>/result.json``, ``<out>/token_accumulation.png`` and the markdown tables, printed and in
``<out>/token_accumulation.md`` (``_common.py`` says what is in them). Measured 2026-12-01: 28 min, one run slowed
5x by other jobs on the 2 cores (``seconds`` per run in result.json).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

# experiments/ is not a package: `python experiments/token_accumulation.py` puts this folder on sys.path.
from _common import (
    experiment_parser,
    flat,
    fmt,
    markdown,
    positive_int,
    pyplot,
    quiet_trainer,
    run_experiment,
    trainable_parameters,
)

from lightning_recipes.callbacks import GradientAccumulation, LRSchedule
from lightning_recipes.datamodules import TextDataModule
from lightning_recipes.recipes.common import CONFIG_DIR
from lightning_recipes.recipes.gpt import GPT

IGNORE_INDEX = -100  # F.cross_entropy's default, which the recipe's loss uses
MODES = ("samples", "tokens")
#: Training runs: both modes, and the control: one batch of k x B windows per step, no accumulation.
RUNS = (*MODES, "one batch")
PRECISIONS = {"float64": "64-true", "float32": "32-true"}
CONFIG = "gpt_stdlib.yaml"


# ---------------------------------------------------------------- the recipe's GPT on ragged windows


def gpt_config() -> dict[str, Any]:
    """``recipes/configs/gpt_stdlib.yaml``, read so that these runs train what ``python recipes/gpt.py fit`` trains."""
    with open(CONFIG_DIR / CONFIG) as f:
        return yaml.safe_load(f)


def ragged_lengths(seed: int, windows: int, context_length: int) -> torch.Tensor:
    """Loss-bearing targets of training windows 0, 1, ...: uniform from 1 to ``context_length``, fixed by ``seed``.

    The generator's seed is mixed from the text "ragged-lengths-<seed>" so that this stream shares nothing with the
    loader's permutation (seeded ``seed + epoch``) or torch's global RNG.
    """
    mixed = int.from_bytes(hashlib.sha256(f"ragged-lengths-{seed}".encode()).digest()[:8], "little") >> 1
    return torch.randint(1, context_length + 1, (windows,), generator=torch.Generator().manual_seed(mixed))


class RaggedGPT(GPT):
    """The recipe's GPT whose training targets past each window's drawn length are ``ignore_index`` (padding).

    Call ``ragged(lengths)`` after construction (an argument of ``__init__`` would land in the hyperparameters).
    Records every training micro-batch it masked and, per micro-batch, the loss and its loss-bearing tokens.
    """

    lengths: torch.Tensor

    def ragged(self, lengths: torch.Tensor) -> RaggedGPT:
        self.lengths = lengths
        self.windows_drawn = 0
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[tuple[float, int]] = []
        return self

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.training:  # validation reads the held-out windows whole
            return batch
        inputs, targets = batch
        count, length = targets.shape
        if self.windows_drawn + count > len(self.lengths):
            raise RuntimeError(f"RaggedGPT: {len(self.lengths)} window lengths drawn, the run needs more")
        lengths = self.lengths[self.windows_drawn : self.windows_drawn + count].to(targets.device)
        self.windows_drawn += count
        padding = torch.arange(length, device=targets.device)[None, :] >= lengths[:, None]
        targets = targets.masked_fill(padding, IGNORE_INDEX)
        self.batches.append((inputs.detach().clone(), targets.detach().clone()))
        return inputs, targets

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        # A host sync per micro-batch: these runs are on the CPU, where it costs nothing.
        self.losses.append((loss.item(), int((batch[1] != IGNORE_INDEX).sum())))
        return loss


def ragged_model(seed: int, windows: int) -> RaggedGPT:
    """The config's model (seeded weights), no sample at the end of fit, with the training windows' lengths."""
    L.seed_everything(seed, verbose=False)  # the weights, and the loader's seed (PL_GLOBAL_SEED)
    kwargs = dict(gpt_config().get("model") or {})
    kwargs.update(vocab_size=256, context_length=text_settings()["context_length"], sample_length=0)
    return RaggedGPT(**kwargs).ragged(ragged_lengths(seed, windows, kwargs["context_length"]))


def text_settings() -> dict[str, Any]:
    return dict(gpt_config()["data"]["init_args"])


def text_data(micro_batch: int) -> TextDataModule:
    return TextDataModule(**{**text_settings(), "batch_size": micro_batch})


def lr_schedule() -> LRSchedule:
    for callback in gpt_config()["trainer"].get("callbacks", []):
        if callback["class_path"].endswith(".LRSchedule"):
            return LRSchedule(**callback.get("init_args", {}))
    raise ValueError(f"recipes/configs/{CONFIG} has no LRSchedule callback")


def clipping() -> dict[str, Any]:
    trainer = gpt_config()["trainer"]
    return {k: trainer[k] for k in ("gradient_clip_val", "gradient_clip_algorithm") if k in trainer}


def same_batches(a: RaggedGPT, b: RaggedGPT) -> bool:
    """Whether two runs trained on the same windows with the same masks, in the same order (any batch sizes)."""
    inputs_a, targets_a = (torch.cat(t) for t in zip(*a.batches))
    inputs_b, targets_b = (torch.cat(t) for t in zip(*b.batches))
    return torch.equal(inputs_a, inputs_b) and torch.equal(targets_a, targets_b)


# ---------------------------------------------------------------- (1) the gradient at initialisation


class _FirstGradient(Callback):
    """The weights and the (accumulated, unclipped) gradient at the first optimizer step."""

    def __init__(self) -> None:
        self.weights: Optional[torch.Tensor] = None
        self.gradient: Optional[torch.Tensor] = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = flat(trainable_parameters(pl_module)).clone()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 0:
            self.gradient = flat([p.grad for p in trainable_parameters(pl_module)]).clone()


def first_gradient(args: argparse.Namespace, precision: str, micro_batch: int,
                   mode: Optional[str]) -> tuple[_FirstGradient, RaggedGPT]:  # fmt: skip
    """One optimizer step on the first k x B windows: one batch (``mode`` None, the reference) or accumulated
    micro-batches of ``micro_batch`` windows weighted by ``mode``."""
    windows = args.k * args.micro_batch
    model = ragged_model(args.seed, windows)
    probe = _FirstGradient()
    callbacks: list[Callback] = [probe]
    if mode is not None:
        callbacks.append(GradientAccumulation(global_batch_size=windows, weight_by=mode))
    trainer = quiet_trainer(max_steps=1, precision=PRECISIONS[precision], limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, datamodule=text_data(micro_batch if mode is not None else windows))
    return probe, model


def gradient_differences(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The accumulated gradient of each mode and micro-batch size vs one batch of the same k x B ragged windows."""
    rows = []
    windows = args.k * args.micro_batch
    for precision in args.precisions:
        reference, reference_model = first_gradient(args, precision, windows, None)
        assert reference.gradient is not None and reference.weights is not None
        g = reference.gradient.double()
        targets = reference_model.batches[0][1]
        for micro_batch in [args.micro_batch, *args.gradient_micro_batches]:
            tokens = [int((t != IGNORE_INDEX).sum()) for t in targets.split(micro_batch)]
            for mode in MODES:
                probe, model = first_gradient(args, precision, micro_batch, mode)
                assert probe.gradient is not None
                if not same_batches(model, reference_model) or len(model.batches) != windows // micro_batch:
                    raise RuntimeError(
                        f"{precision} {mode}: the micro-batches of {micro_batch} are not the reference batch's windows"
                        " and masks"
                    )
                if not torch.equal(probe.weights, reference.weights):
                    raise RuntimeError(f"{precision} {mode}: the initial weights differ from the reference run's")
                a = probe.gradient.double()
                diff = a - g
                rows.append(
                    {
                        "precision": precision,
                        "micro_batch": micro_batch,
                        "micro_batches": windows // micro_batch,
                        "mode": mode,
                        "same_windows_and_masks_as_reference": True,
                        "tokens_per_micro_batch": tokens,
                        "gradient_max_abs": g.abs().max().item(),
                        "max_abs_diff": diff.abs().max().item(),
                        "relative_diff": (diff.norm() / g.norm()).item(),
                        "cosine": (a @ g / (a.norm() * g.norm())).item(),
                    }
                )
    return rows


# ---------------------------------------------------------------- (2) training


def train(args: argparse.Namespace, seed: int, mode: str) -> tuple[dict[str, Any], RaggedGPT]:
    """``args.steps`` optimizer steps of the config's recipe on ragged windows, then val/bpb on unmasked windows.

    ``mode``: ``"samples"`` or ``"tokens"`` (k accumulated micro-batches of B), or ``"one batch"`` (k x B windows).
    """
    windows = args.k * args.micro_batch
    batch, k = (windows, 1) if mode == "one batch" else (args.micro_batch, args.k)
    model = ragged_model(seed, args.steps * windows)
    callbacks: list[Callback] = [lr_schedule()]
    if mode != "one batch":
        callbacks.append(GradientAccumulation(global_batch_size=windows, weight_by=mode))
    trainer = quiet_trainer(
        max_steps=args.steps,
        precision="32-true",
        # One validation, after the last micro-batch of the last step (as the config validates once, at its end).
        val_check_interval=args.steps * k,
        check_val_every_n_epoch=None,
        limit_val_batches=args.val_windows // batch,
        callbacks=callbacks,
        **clipping(),
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=text_data(batch))
    seconds = time.perf_counter() - start
    if trainer.global_step != args.steps or len(model.losses) != args.steps * k:
        raise RuntimeError(f"seed {seed} {mode}: {trainer.global_step} steps of {len(model.losses)} batches ran")
    # Per optimizer window: the mean loss over its loss-bearing tokens (every run measured by the same rule).
    steps = [model.losses[i : i + k] for i in range(0, len(model.losses), k)]
    per_step = [sum(loss * n for loss, n in w) / sum(n for _, n in w) for w in steps]
    last = model.losses[-args.last_steps * k :]
    run = {
        "seed": seed,
        "mode": mode,
        "val_bpb": trainer.callback_metrics["val/bpb"].item(),
        "val_loss": trainer.callback_metrics["val/loss"].item(),
        "train_loss_per_token_last": sum(loss * n for loss, n in last) / sum(n for _, n in last),
        "train_loss_per_token_per_step": per_step,
        "loss_bearing_tokens": sum(n for _, n in model.losses),
        "seconds": seconds,
    }
    return run, model


def _spread(tokens: Sequence[int]) -> str:
    """A micro-batch's token counts: all of them when few, else min–max and the mean."""
    if len(tokens) <= 4:
        return ", ".join(map(str, tokens))
    return f"{min(tokens)}–{max(tokens)} (mean {statistics.mean(tokens):.1f})"


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return fmt(values[0]) if values else "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def token_accumulation(args: argparse.Namespace) -> dict[str, Any]:
    windows = args.k * args.micro_batch
    if args.val_windows % windows:
        raise ValueError(
            f"--val-windows {args.val_windows} is not a multiple of --k x --micro-batch = {windows}: validation reads"
            f" whole batches of both sizes; use {args.val_windows // windows * windows or windows}"
        )
    if any(windows % b for b in args.gradient_micro_batches):
        raise ValueError(
            f"--gradient-micro-batches {' '.join(map(str, args.gradient_micro_batches))}: each must divide --k x"
            f" --micro-batch = {windows} (the reference batch), e.g. 1 or {args.micro_batch // 2 or 1}"
        )
    if args.last_steps > args.steps:
        raise ValueError(f"--last-steps {args.last_steps} is more than --steps {args.steps}: use at most {args.steps}")
    gradients = gradient_differences(args)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        models = {}
        for mode in RUNS:
            run, models[mode] = train(args, seed, mode)
            runs.append(run)
            print(f"seed {seed} {mode}: val/bpb {run['val_bpb']:.4f}, train loss/token {run['train_loss_per_token_last']:.4f}"
                  f" ({run['seconds']:.0f} s)", flush=True)
        for mode in RUNS[1:]:
            if not same_batches(models[RUNS[0]], models[mode]):
                raise RuntimeError(f"seed {seed}: {mode} did not train on the windows and masks of {RUNS[0]}")
        for mode in RUNS:
            next(r for r in runs if r["seed"] == seed and r["mode"] == mode)["same_windows_and_masks_across_runs"] = True
        del models
    by = {(r["seed"], r["mode"]): r for r in runs}
    # tokens - samples: what the weighting does; tokens - one batch: the same gradient up to float32 rounding, so
    # the spread that rounding alone grows into over the run (the noise floor of the first difference).
    pairs = (("tokens", "samples"), ("tokens", "one batch"))
    paired = {
        f"{a} - {b}": [
            {
                "seed": seed,
                "val_bpb": by[seed, a]["val_bpb"] - by[seed, b]["val_bpb"],
                "train_loss_per_token_last": (
                    by[seed, a]["train_loss_per_token_last"] - by[seed, b]["train_loss_per_token_last"]
                ),
            }
            for seed in args.seeds
        ]
        for a, b in pairs
    }
    summary = {
        mode: {
            "val_bpb": [by[s, mode]["val_bpb"] for s in args.seeds],
            "train_loss_per_token_last": [by[s, mode]["train_loss_per_token_last"] for s in args.seeds],
        }
        for mode in RUNS
    }
    plot = _plot(runs, gradients, args)

    gradient_table = markdown(
        ["dtype", "k × B", "loss-bearing tokens per micro-batch", "mode", "max \\|Δg\\| (max \\|g\\|)", "‖Δg‖/‖g‖",
         "cosine to reference"],
        [
            [r["precision"], f"{r['micro_batches']} × {r['micro_batch']}", _spread(r["tokens_per_micro_batch"]),
             r["mode"], f"{fmt(r['max_abs_diff'])} ({fmt(r['gradient_max_abs'])})", r["relative_diff"],
             f"{r['cosine']:.10f}"]
            for r in gradients
        ],
    )
    seeds = ", ".join(map(str, args.seeds))
    training_table = markdown(
        ["mode", f"val bpb (seeds {seeds})", "mean ± std", f"train loss/token, last {args.last_steps} steps",
         "mean ± std"],
        [
            [mode, ", ".join(f"{v:.4f}" for v in summary[mode]["val_bpb"]), _mean_std(summary[mode]["val_bpb"]),
             ", ".join(f"{v:.4f}" for v in summary[mode]["train_loss_per_token_last"]),
             _mean_std(summary[mode]["train_loss_per_token_last"])]
            for mode in RUNS
        ]
        + [
            [f"{name.replace('-', '−')} (paired)", ", ".join(f"{p['val_bpb']:+.4f}" for p in pair),
             _mean_std([p["val_bpb"] for p in pair]),
             ", ".join(f"{p['train_loss_per_token_last']:+.4f}" for p in pair),
             _mean_std([p["train_loss_per_token_last"] for p in pair])]
            for name, pair in paired.items()
        ],
    )
    table = (
        f"Gradient at initialisation (seed {args.seed}): k accumulated micro-batches of B ragged windows vs one batch"
        f" of {args.k * args.micro_batch} (loss: the mean over all its loss-bearing tokens)\n\n"
        f"{gradient_table}\n\n"
        f"Training: {args.steps} optimizer steps of {args.k} x {args.micro_batch} ragged windows (one batch: {windows}"
        f" windows per step, no accumulation); val bpb on"
        f" {args.val_windows} unmasked held-out windows ({args.val_windows * text_settings()['context_length']:,} bytes)\n\n"
        f"{training_table}"
    )
    (args.out / "token_accumulation.md").write_text(table + "\n")
    return {
        "config": f"recipes/configs/{CONFIG}",
        "lengths": "uniform from 1 to the context length, per window",
        "gradient": gradients,
        "runs": runs,
        "paired_differences": paired,
        "summary": summary,
        "plots": [plot],
        "table": table,
    }


def _plot(runs: list[dict[str, Any]], gradients: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = [f"{r['precision']}\n{r['micro_batches']}×{r['micro_batch']}\n{r['mode']}" for r in gradients]
    axes[0].bar(range(len(gradients)), [r["relative_diff"] for r in gradients],
                color=["C0" if r["mode"] == "samples" else "C1" for r in gradients])
    axes[0].set_xticks(range(len(gradients)), labels, fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("‖Δg‖ / ‖g‖ vs one large batch")
    axes[0].set_title("gradient at initialisation", fontsize=10)
    for color, mode in zip(("C0", "C1", "C2"), RUNS):
        mine = [r for r in runs if r["mode"] == mode]
        for i, r in enumerate(mine):
            losses = r["train_loss_per_token_per_step"]
            smooth = [statistics.mean(losses[max(0, j - 9) : j + 1]) for j in range(len(losses))]  # last 10 steps
            axes[1].plot(range(1, len(losses) + 1), smooth, color=color, alpha=0.7, linewidth=1,
                         label=mode if i == 0 else None)
        axes[2].scatter([r["seed"] for r in mine], [r["val_bpb"] for r in mine], color=color, label=mode)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("training loss per token (nats)")
    axes[1].set_title("training, mean of the last 10 steps (every seed)", fontsize=10)
    axes[2].set_xlabel("seed")
    axes[2].set_xticks(list(args.seeds))
    axes[2].set_ylabel(f"val bpb, {args.val_windows} held-out windows")
    axes[2].set_title(f"after {args.steps} steps", fontsize=10)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("Token-weighted vs micro-batch-mean accumulation, ragged windows (byte-level GPT, stdlib)")
    fig.tight_layout()
    path = args.out / "token_accumulation.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = experiment_parser(
        "token_accumulation",
        "Token-weighted vs micro-batch-mean gradient accumulation on ragged windows (the GPT recipe, stdlib bytes).",
    )
    p.set_defaults(out=Path("docs/experiments/token_accumulation"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the training runs, each trained in both modes (default: %(default)s); the"
                        " gradient comparison uses --seed")
    p.add_argument("--steps", type=positive_int, default=150, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--micro-batch", type=positive_int, default=8, help="windows per micro-batch B (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=4, help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--val-windows", type=positive_int, default=1280,
                   help="held-out windows for val/bpb, a multiple of k x B (default: %(default)s: the GPT"
                        " grids' 40 batches of 32)")
    p.add_argument("--last-steps", type=positive_int, default=20,
                   help="optimizer steps at the end over which the training loss per token is averaged"
                        " (default: %(default)s)")
    p.add_argument("--gradient-micro-batches", type=positive_int, nargs="*", default=[1],
                   help="more micro-batch sizes for the gradient comparison, each dividing k x B: 1 is one window"
                        " (document) per micro-batch (default: %(default)s)")
    # One torch thread unless --threads says otherwise: the float32 sums compared here do not depend on the core
    # count, and a busy 2-core machine does not make the threads wait on each other.
    p.set_defaults(threads=1)
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=list(PRECISIONS),
                   help="dtypes of the gradient comparison (default: %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    # The module's on_after_batch_transfer masks the batches (Lightning says it overrides the data module's: it has none).
    return run_experiment("token_accumulation", _parser(), token_accumulation, argv,
                          expected_warnings=[r"You have overridden `on_after_batch_transfer` in `LightningModule`"])


if __name__ == "__main__":
    main()
