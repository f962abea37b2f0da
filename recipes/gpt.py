"""GPT recipe: a decoder-only Transformer language model (pre-LN, AdamW with betas (0.9, 0.95), clipping by norm,
warmup + cosine), trained by default on the bytes of this Python's standard library.

    python recipes/gpt.py fit            # offline, CPU, under 3 minutes on 2 cores; prints and saves a sample at the end
    python recipes/gpt.py validate --ckpt_path runs/gpt_stdlib/checkpoints/last.ckpt      # val/loss, val/bpb
    python recipes/gpt.py predict --ckpt_path runs/gpt_stdlib/checkpoints/last.ckpt --data.prompt "def " \\
        --model.sample_length 300 --model.temperature 0.8 --model.top_k 20 --seed_everything 1
    python recipes/gpt.py fit --config recipes/configs/gpt2_124m.yaml --data.path data/fineweb10B   # GPUs
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from lightning_recipes.datamodules.base import check_number
from lightning_recipes.datamodules.text import TextDataModule
from lightning_recipes.recipes.common import (
    check_model_arg,
    check_true_half,
    param_groups,
    run_cli,
    shard_with_fsdp2,
)


class Block(nn.Module):
    """One Transformer block: causal self-attention, then an MLP, each a residual branch; pre-LN or post-LN."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.heads, self.dropout, self.norm_first = heads, dropout, norm_first
        self.attn_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.mlp_out = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.attn_out(y.transpose(1, 2).reshape(batch, length, width)))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.mlp_out(F.gelu(self.mlp_in(x), approximate="tanh")))  # GPT-2's GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:  # pre-LN (GPT-2): each branch reads a normalised copy, the residual stream is left alone
            x = x + self.attention(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attention(x))  # post-LN (the original Transformer): normalise after each sum
        return self.mlp_norm(x + self.mlp(x))


class GPTModel(nn.Module):
    """Token + learned position embeddings, ``depth`` blocks, a final LayerNorm (pre-LN only) and the output head."""

    def __init__(self, vocab: int, context_length: int, depth: int, width: int, heads: int, mlp_ratio: int,
                 dropout: float, norm_first: bool, tie_embeddings: bool, activation_checkpointing: bool) -> None:  # fmt: skip
        super().__init__()
        self.tok_embedding = nn.Embedding(vocab, width)
        self.pos_embedding = nn.Embedding(context_length, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, norm_first) for _ in range(depth))
        self.norm = nn.LayerNorm(width) if norm_first else nn.Identity()  # post-LN blocks end normalised already
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_embeddings:  # one matrix reads tokens in and scores them out (Press & Wolf 2017, GPT-2)
            self.head.weight = self.tok_embedding.weight
        self.activation_checkpointing = activation_checkpointing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_embedding(tokens) + self.pos_embedding(positions))
        for block in self.blocks:
            # Keep only each block's input; recompute the block in backward (non-reentrant: composes with FSDP2 and
            # autocast). Same loss and gradients, activation memory of one block instead of `depth`.
            recompute = self.activation_checkpointing and torch.is_grad_enabled()
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.head(self.norm(x))


class GPT(LightningModule):
    """A GPT language model; the arguments below are the recipe's whole model, optimizer and sampling config."""

    #: Data-module attributes the CLI copies into the model's arguments before anything is built.
    data_links = ("vocab_size", "context_length")

    def __init__(
        self,
        vocab_size: int = 256,
        context_length: int = 128,
        depth: int = 4,
        width: int = 128,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        norm_first: bool = True,
        tie_embeddings: bool = True,
        pad_vocab_multiple: int = 1,
        activation_checkpointing: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        sample_length: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
    ) -> None:
        """
        Args:
            vocab_size: token ids the data holds (linked from the data module: 256 for bytes).
            context_length: the longest input, in tokens: rows of the position embedding (linked from the data).
            depth: number of Transformer blocks.
            width: embedding and residual-stream dimension; must be divisible by ``heads``.
            heads: attention heads per block.
            mlp_ratio: hidden size of each block's MLP, as a multiple of ``width``.
            dropout: dropout on the embeddings, the attention weights and both residual branches.
            norm_first: pre-LN (LayerNorm at the start of each branch, plus one before the head; GPT-2) if True,
                post-LN (LayerNorm after each residual sum; the original Transformer) if False.
            tie_embeddings: the output head reuses the token embedding matrix.
            pad_vocab_multiple: round the embedding and head rows up to a multiple of this (64 in nanoGPT: 50257 ->
                50304, faster matmuls); the extra ids are never targets and never sampled.
            activation_checkpointing: recompute each block in backward instead of keeping its activations.
            lr: peak learning rate; the config's LRSchedule callback warms up to it and decays it.
            weight_decay: AdamW's decoupled weight decay, on the weight matrices only (see ``configure_optimizers``).
            betas: AdamW's moment decay rates; beta2 = 0.95 (GPT-3, nanoGPT) forgets old gradient scales faster than
                0.999, which keeps updates in check when gradients grow suddenly.
            eps: AdamW's epsilon.
            sample_length: tokens (bytes, for text) generated by ``predict`` and at the end of ``fit`` (0: none).
            temperature: divides the logits before sampling; 0 picks the most likely token.
            top_k: sample among the k most likely tokens only; 0 for all of them.
        """
        super().__init__()
        check_number("vocab_size", vocab_size, "use an int >= 2", option="--data.vocab_size", integer=True, at_least=2)
        check_number("context_length", context_length, "use an int >= 1", option="--data.context_length", integer=True, at_least=1)
        for name, value in (("depth", depth), ("width", width), ("heads", heads), ("mlp_ratio", mlp_ratio),
                            ("pad_vocab_multiple", pad_vocab_multiple)):  # fmt: skip
            check_model_arg(name, value, "use an int >= 1", integer=True, at_least=1)
        if width % heads:
            raise ValueError(
                f"heads={heads} does not divide width={width} (--model.heads, --model.width): choose --model.heads among "
                f"{[h for h in range(1, min(width, 64) + 1) if width % h == 0]}, or change --model.width."
            )
        check_model_arg("dropout", dropout, "use a probability in [0, 1)", at_least=0, below=1)
        check_model_arg("lr", lr, "use a number > 0", above=0)
        check_model_arg("weight_decay", weight_decay, "use a number >= 0", at_least=0)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas={tuple(betas)!r} is invalid: give two numbers in [0, 1), e.g. [0.9, 0.95] (--model.betas).")
        check_model_arg("eps", eps, "use a number > 0", above=0)
        check_model_arg("sample_length", sample_length, "use an int >= 0", integer=True, at_least=0)
        check_model_arg("temperature", temperature, "use a number >= 0 (0: greedy)", at_least=0)
        check_model_arg("top_k", top_k, "use an int >= 0 (0: all tokens)", integer=True, at_least=0)
        # Sampling settings stay out of the checkpoint's hyperparameters: LightningCLI applies those over the command
        # line when given --ckpt_path, which would make `predict --model.temperature 0.8` use the training run's value.
        self.save_hyperparameters(ignore=["sample_length", "temperature", "top_k"])
        self.sampling = {"length": sample_length, "temperature": temperature, "top_k": top_k}
        padded_vocab = math.ceil(vocab_size / pad_vocab_multiple) * pad_vocab_multiple
        self.model = GPTModel(padded_vocab, context_length, depth, width, heads, mlp_ratio, dropout, norm_first,
                              tie_embeddings, activation_checkpointing)  # fmt: skip
        # GPT-2's initialisation (as in nanoGPT): N(0, 0.02) for every matrix and embedding, zero biases, and
        # 0.02 / sqrt(2 * depth) for the two projections that add into the residual stream, so that its variance
        # at the output does not grow with depth (2 residual branches per block).
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.model.blocks:
            for projection in (block.attn_out, block.mlp_out):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * depth))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._batch_started: Optional[float] = None
        self._batch_tokens = 0
        self._tokens_per_sec: Optional[float] = None
        self._trained_steps: Optional[int] = None

    # ------------------------------------------------------------------------------------------------ set-up

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2): one unit per block, then the root (embeddings, final norm, head)."""
        shard_with_fsdp2(self, self.model, lambda: self.model.blocks)

    def setup(self, stage: str) -> None:
        check_true_half(self, supported=True)
        data = getattr(self.trainer, "datamodule", None)
        for name, what in (("vocab_size", "the embedding has no row for the larger ids"),
                           ("context_length", "the position embedding has no row for the later positions")):  # fmt: skip
            ours, theirs = self.hparams[name], getattr(data, name, None)
            if theirs is not None and theirs > ours:
                raise ValueError(
                    f"the data's {name}={theirs} is above the model's {name}={ours}: {what}. Set --data.{name} to at "
                    f"most {ours}, or build the model with {name}={theirs} (the recipe CLI links it from the data)."
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._trained_steps = checkpoint.get("global_step")  # what predict's sample reports
        saved = checkpoint.get("hyper_parameters", {})
        for name in self.data_links:
            if name in saved and saved[name] != self.hparams[name]:
                raise ValueError(
                    f"the checkpoint's model has {name}={saved[name]}, but this run's data gives {name}="
                    f"{self.hparams[name]}: run it with --data.{name} {saved[name]}."
                )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on the matrices of the matmuls only.

        Decayed: every block's ``qkv``, ``attn_out``, ``mlp_in`` and ``mlp_out`` weight, and the output head's
        (with tied embeddings that matrix is ``tok_embedding.weight``, listed under that name). Not decayed: biases,
        LayerNorm scales and shifts, ``pos_embedding.weight`` and an untied ``tok_embedding.weight``: lookup tables,
        where decay shrinks the rows of rare tokens and positions on every step while their gradients are rare.
        """
        no_decay = ["pos_embedding.weight"] + ([] if self.hparams.tie_embeddings else ["tok_embedding.weight"])
        groups = param_groups(self.model, self.hparams.weight_decay, no_decay=no_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)

    # ---------------------------------------------------------------------------------------------- training

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.hparams.context_length:
            raise ValueError(
                f"input of {tokens.shape[1]} tokens is longer than context_length={self.hparams.context_length}: "
                "the model has no position embedding beyond it."
            )
        return self.model(tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)[..., : self.hparams.vocab_size]  # padded ids are never targets: leave them out
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # nats per token

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Throughput from the wall time between batch starts (data, step, callbacks: all of it), no device sync.
        now = time.perf_counter()
        if self._batch_started is not None:
            self._tokens_per_sec = self._batch_tokens * self.trainer.world_size / (now - self._batch_started)
        self._batch_started, self._batch_tokens = now, batch[1].numel()

    def on_validation_start(self) -> None:
        self._batch_started = None  # the interval that holds a validation is not training time

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        if self._tokens_per_sec is not None:
            self.log("train/tokens_per_sec", self._tokens_per_sec)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Weighted by tokens: the epoch's figure is the mean over every held-out target token, across processes.
        self.val_loss.update(self._loss(batch), weight=batch[1].numel())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_loss.update(self._loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_loss(self.val_loss, "val")

    def on_test_epoch_end(self) -> None:
        self._log_loss(self.test_loss, "test")

    def _log_loss(self, metric: MeanMetric, stage: str) -> None:
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        if getattr(getattr(self.trainer, "datamodule", None), "tokens_are_bytes", False):
            # One token is one byte: nats per byte / ln 2 = bits per byte, exactly.
            self.log(f"{stage}/bpb", loss / math.log(2), prog_bar=True)

    # ---------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor) -> torch.Tensor:
        """Continue ``prompt`` (1, n) by ``sample_length`` tokens, drawn with torch's RNG (``--seed_everything``)."""
        length, temperature, top_k = self.sampling["length"], self.sampling["temperature"], self.sampling["top_k"]
        was_training = self.training
        self.eval()
        tokens = prompt.to(self.device)
        for _ in range(length):
            logits = self(tokens[:, -self.hparams.context_length :])[:, -1, : self.hparams.vocab_size].float()
            if temperature == 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1)
            tokens = torch.cat([tokens, next_token], dim=1)
        self.train(was_training)
        return tokens[:, prompt.shape[1] :]

    def _sample_and_save(self, prompt: torch.Tensor, file_name: str) -> str:
        # Every process generates (under FSDP2 each forward needs them all); rank zero prints and writes.
        data = self.trainer.datamodule
        text = data.decode(prompt) + data.decode(self.generate(prompt))
        if self.trainer.is_global_zero:
            path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as file:
                file.write(text + "\n")
            settings = ", ".join(f"{k} {v}" for k, v in self.sampling.items())
            steps = self.trainer.global_step or self._trained_steps or 0
            print(f"--- sample after {steps} training steps ({settings}), saved to {path} ---\n{text}\n---")
        return text

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> str:
        return self._sample_and_save(batch, "samples.txt")

    def on_fit_end(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if self.sampling["length"] and isinstance(data, TextDataModule):
            self._sample_and_save(data.prompt_tokens(), "sample.txt")


def main(args: Optional[list[str]] = None) -> None:
    run_cli(GPT, "gpt_stdlib.yaml", args=args, datamodule_class=TextDataModule)


if __name__ == "__main__":
    main()
