"""The GPT recipe from the user's side: the model's exact properties, bits per byte, sampling, bad input, the CLI,
exact resume, and DDP / FSDP2 in 2 real CPU processes (gloo)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_fakes import write_text_folder, write_token_bins
from two_processes import run_two_processes
from lightning_recipes.callbacks import ResumableCheckpoint
from lightning_recipes.datamodules import TextDataModule
from lightning_recipes.recipes.gpt import GPT
from lightning_recipes.recipes.gpt import main as gpt_main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "width": 32, "heads": 2, "sample_length": 0}


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": tmp_path}  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_falls_on_the_matmul_matrices_only(tied):
    module = GPT(depth=2, width=32, heads=2, tie_embeddings=tied, weight_decay=0.1)
    decay, no_decay = module.configure_optimizers().param_groups
    blocks = {f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("qkv", "attn_out", "mlp_in", "mlp_out")}
    # Tied, the head's matrix is the token embedding and is named (once) after it.
    assert _names(module.model, decay) == blocks | ({"tok_embedding.weight"} if tied else {"head.weight"})
    biases_and_norms = {f"blocks.{i}.{layer}.{kind}" for i in range(2) for layer, kind in
                        [(l, "bias") for l in ("qkv", "attn_out", "mlp_in", "mlp_out")] +
                        [(n, k) for n in ("attn_norm", "mlp_norm") for k in ("weight", "bias")]}  # fmt: skip
    expected_no_decay = biases_and_norms | {"norm.weight", "norm.bias", "pos_embedding.weight"}
    assert _names(module.model, no_decay) == expected_no_decay | (set() if tied else {"tok_embedding.weight"})
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.95)


def test_tied_embeddings_share_one_tensor_and_stay_shared_through_training(tmp_path):
    model = GPT(**TINY)
    head, embedding = model.model.head.weight, model.model.tok_embedding.weight
    assert head is embedding and head.data_ptr() == embedding.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in GPT(**TINY, tie_embeddings=False).parameters()) - 256 * 32
    data = TextDataModule(path=write_text_folder(tmp_path / "text"), context_length=16, batch_size=4)
    before = embedding.detach().clone()
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, data)
    assert model.model.head.weight is model.model.tok_embedding.weight and not torch.equal(before, embedding)
    untied = GPT(**TINY, tie_embeddings=False)
    assert untied.model.head.weight.data_ptr() != untied.model.tok_embedding.weight.data_ptr()


def test_gpt2_initialisation_scales_the_residual_projections_by_depth():
    torch.manual_seed(0)
    model = GPT(depth=8, width=256, heads=4).model
    for block in model.blocks:
        # 0.02 / sqrt(2 x 8) = 0.005 on the projections into the residual stream; 0.02 elsewhere.
        for layer, std in ((block.attn_out, 0.005), (block.mlp_out, 0.005), (block.qkv, 0.02), (block.mlp_in, 0.02)):
            assert layer.weight.std().item() == pytest.approx(std, rel=0.02) and not layer.bias.any()
        assert torch.equal(block.attn_norm.weight, torch.ones(256)) and not block.attn_norm.bias.any()
    assert model.tok_embedding.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.pos_embedding.weight.std().item() == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize("norm_first", [True, False])
def test_attention_is_causal_a_later_token_never_changes_earlier_logits(norm_first):
    torch.manual_seed(0)
    model = GPT(**TINY, norm_first=norm_first).eval()
    tokens = torch.randint(256, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])  # bit for bit: positions 0-8 cannot see position 9
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the change is visible from position 9 on
    assert isinstance(model.model.norm, torch.nn.LayerNorm if norm_first else torch.nn.Identity)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = (torch.randint(256, (2, 16)), torch.randint(256, (2, 16)))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(**TINY, activation_checkpointing=recompute)
        loss = model._loss(batch)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("pad", [1, 320])
def test_val_bpb_is_val_loss_over_ln2_exactly_8_bits_for_a_uniform_model(tmp_path, pad):
    # A zero token embedding, tied to the head, makes every logit 0: the model predicts each of the 256 bytes with
    # probability 1/256, i.e. ln 256 nats = 8 bits per byte by hand. With the vocabulary padded to 320 rows the padded
    # ids are left out of the softmax, so the figure stays 8 bits (ln 320 / ln 2 = 8.32 if they were not).
    model = GPT(**TINY, pad_vocab_multiple=pad)
    with torch.no_grad():
        model.model.tok_embedding.weight.zero_()
    data = TextDataModule(path=write_text_folder(tmp_path / "text"), context_length=16, batch_size=4)
    (result,) = _trainer(tmp_path).validate(model, data, verbose=False)
    # float32: ln 256 rounds to 5.5451775, and the token-weighted mean over 1,120 tokens adds a few ulp.
    assert result["val/loss"] == pytest.approx(math.log(256), rel=1e-6)
    assert result["val/bpb"] == pytest.approx(8.0, rel=1e-6)
    assert result["val/bpb"] == pytest.approx(result["val/loss"] / math.log(2), rel=1e-7)
    assert model.model.head.weight.shape == (256 if pad == 1 else 320, 32)


def test_generation_is_seeded_greedy_at_temperature_0_and_top_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(**{**TINY, "sample_length": 20, "context_length": 8})
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])  # longer than the context: the model sees the last 8
    model.sampling.update(temperature=0.0)
    greedy = model.generate(prompt)
    tokens = prompt
    for _ in range(20):
        tokens = torch.cat([tokens, model(tokens[:, -8:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy.shape == (1, 20) and torch.equal(greedy, tokens[:, 10:])
    model.sampling.update(temperature=1.0, top_k=1)
    assert torch.equal(model.generate(prompt), greedy)
    model.sampling.update(top_k=0)
    torch.manual_seed(5)
    first = model.generate(prompt)
    torch.manual_seed(5)
    assert torch.equal(model.generate(prompt), first) and not torch.equal(first, greedy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 100, "heads": 8}, r"heads=8 does not divide width=100 \(--model.heads, --model.width\): choose --model.heads among \[1, 2, 4, 5, 10, 20, 25, 50\]"),
        ({"depth": 0}, r"depth=0 is invalid: use an int >= 1 \(--model.depth\)"),
        ({"dropout": 1.0}, r"dropout=1.0 is invalid: use a probability in \[0, 1\) \(--model.dropout\)"),
        ({"lr": 0.0}, r"lr=0.0 is invalid: use a number > 0 \(--model.lr\)"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1 is invalid: use a number >= 0 \(--model.weight_decay\)"),
        ({"betas": (0.9, 1.0)}, r"betas=\(0.9, 1.0\) is invalid: give two numbers in \[0, 1\)"),
        ({"temperature": -1.0}, r"temperature=-1.0 is invalid: use a number >= 0 \(0: greedy\) \(--model.temperature\)"),
        ({"top_k": -1}, r"top_k=-1 is invalid: use an int >= 0 \(0: all tokens\) \(--model.top_k\)"),
        ({"context_length": 0}, r"context_length=0 is invalid: use an int >= 1 \(--data.context_length\)"),
        ({"pad_vocab_multiple": 0}, r"pad_vocab_multiple=0 is invalid: use an int >= 1 \(--model.pad_vocab_multiple\)"),
    ],
)
def test_bad_model_arguments_name_the_option_the_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT(**kwargs)


def test_a_model_too_small_for_the_data_fails_before_training(tmp_path):
    data = TextDataModule(path=write_text_folder(tmp_path / "text"), context_length=32, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"the data's context_length=32 is above the model's context_length=16: the "
                                         r"position embedding has no row for the later positions. Set --data.context_length to at most 16"):
        trainer.fit(GPT(**TINY, context_length=16), data)
    assert trainer.global_step == 0
    tokens = TextDataModule(path=write_token_bins(tmp_path / "bins", vocab_size=300), vocab_size=300, context_length=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"the data's vocab_size=300 is above the model's vocab_size=256: the embedding has no row"):
        trainer.fit(GPT(**TINY), tokens)
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"input of 17 tokens is longer than context_length=16"):
        GPT(**TINY, context_length=16)(torch.zeros(1, 17, dtype=torch.long))


def test_fit_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(tmp_path):
    # Dropout and the random window offsets both draw from the RNGs: the resumed run must restore them exactly.
    text = write_text_folder(tmp_path / "text")

    def fit(steps, root, ckpt_path=None):
        L.seed_everything(0)
        model = GPT(**{**TINY, "dropout": 0.1})
        data = TextDataModule(path=text, context_length=16, batch_size=4)
        checkpoints = ResumableCheckpoint(dirpath=str(root), every_n_steps=3, keep_last=2)
        trainer = _trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[checkpoints], enable_checkpointing=True)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    full, trainer = fit(6, tmp_path / "full")
    assert trainer.num_training_batches > 6  # the checkpoint at step 3 is mid-epoch
    fit(3, tmp_path / "part")
    resumed, trainer = fit(6, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "epoch=0-step=3.ckpt"))
    assert trainer.global_step == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    L.seed_everything(0)
    initial = GPT(**{**TINY, "dropout": 0.1})  # what both runs started from
    assert not torch.equal(full.model.blocks[0].qkv.weight, initial.model.blocks[0].qkv.weight)


def _events(run_dir: Path) -> set[str]:
    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_cli_fit_then_validate_test_and_sample_from_the_checkpoint(tmp_path, capsys):
    text = write_text_folder(tmp_path / "text")
    tiny = [f"--data.path={text}", "--data.context_length=16", "--data.batch_size=4", "--model.depth=1",
            "--model.width=32", "--model.heads=2", "--trainer.enable_progress_bar=false"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    fit = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpt.py"), "fit", *tiny, "--trainer.max_steps=4",
                          "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--model.sample_length=12"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = tmp_path / "runs" / "gpt_stdlib" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "runs" / "gpt_stdlib" / "version_0"
    assert last.is_file() and (run_dir / "config.yaml").is_file()
    sample = (run_dir / "sample.txt").read_text()
    assert sample.startswith("def f") and "--- sample after 4 training steps (length 12" in fit.stdout
    assert {"train/loss", "train/tokens_per_sec", "val/loss", "val/bpb", "lr/decay", "lr/no_decay", "grad_norm/total"} <= _events(run_dir)
    assert "'file_count': 40" in fit.stderr + fit.stdout  # the corpus is reported once

    common = [f"--ckpt_path={last}", *tiny[:3], "--trainer.enable_progress_bar=false"]
    gpt_main(["validate", *common])
    gpt_main(["test", *common])
    with pytest.raises(ValueError, match=r"the checkpoint's model has context_length=16, but this run's data gives "
                                         r"context_length=32: run it with --data.context_length 16"):
        gpt_main(["validate", f"--ckpt_path={last}", tiny[0], "--data.context_length=32", "--data.batch_size=4"])

    sampling = [*common, "--data.prompt=def ", "--model.sample_length=30", "--model.temperature=0.8", "--model.top_k=5",
                "--seed_everything=3"]  # fmt: skip
    predict = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpt.py"), "predict", *sampling], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "--- sample after 4 training steps (length 30, temperature 0.8, top_k 5)" in predict.stdout
    (saved,) = tmp_path.glob("runs/gpt_stdlib/version_*/samples.txt")
    capsys.readouterr()
    gpt_main(["predict", *sampling])  # the same seed from Python: the same text
    assert saved.read_text() in capsys.readouterr().out and saved.read_text().startswith("def ")


# ------------------------------------------------------------------------------------------ 2 processes, gloo


def _distributed_worker(rank: int, port: int, out_dir: str, text: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    seen = {}

    def run(name, strategy, steps, ckpt_path=None):
        L.seed_everything(0)
        model = GPT(**{**TINY, "lr": 1e-2})
        data = TextDataModule(path=text, context_length=16, batch_size=4, val_percent=10)
        keep = ResumableCheckpoint(dirpath=os.path.join(out_dir, name), every_n_steps=2, keep_last=2)
        # No validation while fitting (none before the step 4 it stops at); trainer.validate below runs all of it.
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, num_sanity_val_steps=0,
                            val_check_interval=1000, check_val_every_n_epoch=None, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[keep],
                            default_root_dir=out_dir)  # fmt: skip
        trainer.fit(model, data, ckpt_path=ckpt_path)
        (result,) = trainer.validate(model, data, verbose=False)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{name}.pt"))
        seen[name] = {"val": result, "step": trainer.global_step, "sharded": type(model.model.blocks[0].qkv.weight).__name__,
                      "tied": model.model.head.weight is model.model.tok_embedding.weight}  # fmt: skip

    run("ddp", DDPStrategy(process_group_backend="gloo"), 4)
    run("fsdp2", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 4)
    resume_from = os.path.join(out_dir, "fsdp2", "epoch=0-step=2.ckpt")
    run("fsdp2_resumed", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 4, ckpt_path=resume_from)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(seen, file)


@pytest.mark.slow
def test_ddp_and_fsdp2_in_two_processes_train_the_same_model_and_fsdp2_resumes_exactly(tmp_path):
    # 2,000 bytes of one file, 10 % held out: 200 bytes = 12 windows of 16, an even number, so the 2 processes
    # split validation without padding and its mean over tokens is the single-process one.
    text = tmp_path / "book.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200))[:2000])
    run_two_processes(_distributed_worker, str(tmp_path), str(text))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["fsdp2"]["sharded"] == "DTensor" and ranks[0]["ddp"]["sharded"] == "Parameter"
    assert all(r[name]["tied"] for r in ranks for name in ("ddp", "fsdp2"))  # the tie survives fully_shard
    assert all(r[name]["step"] == 4 for r in ranks for name in ("ddp", "fsdp2", "fsdp2_resumed"))
    ddp, fsdp2, resumed = (torch.load(tmp_path / f"{name}.pt") for name in ("ddp", "fsdp2", "fsdp2_resumed"))
    L.seed_everything(0)
    initial = GPT(**TINY).state_dict()
    assert max(float((ddp[k] - initial[k]).abs().max()) for k in initial) > 1e-3  # it trained
    # All-reduce (DDP) and reduce-scatter (FSDP2) round the averaged gradients differently by a few ulp.
    assert max(float((ddp[k] - fsdp2[k]).abs().max()) for k in ddp) < 1e-5
    assert all(torch.equal(fsdp2[k], resumed[k]) for k in fsdp2), "FSDP2 resume from step 2 is not bit-exact"
    # Validation across 2 processes is the mean over all 12 held-out windows: the single-process figure.
    model = GPT(**TINY)
    model.load_state_dict(ddp)
    data = TextDataModule(path=str(text), context_length=16, batch_size=4, val_percent=10)
    (single,) = _trainer(tmp_path).validate(model, data, verbose=False)
    for rank in ranks:
        assert rank["ddp"]["val"]["val/loss"] == pytest.approx(single["val/loss"], abs=1e-6)
        assert rank["ddp"]["val"]["val/bpb"] == pytest.approx(single["val/loss"] / math.log(2), abs=1e-6)


# The GPT default (`python recipes/gpt.py fit`: gpt_stdlib.yaml, this Python's standard library) killed with -9
# mid-epoch, then `--ckpt_path last`: the same weights and AdamW state as a run never interrupted. Sized down
# (1 block x 32, context 32, 12 steps) by a copy of the default config, everything else as shipped.
KILL_AT = 6  # PauseAfterCheckpoint: the first batch after the step-6 checkpoint


def _default_config_sized_down(path: Path, extra_callbacks: list[dict]) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "recipes/configs/gpt_stdlib.yaml").read_text())
    config["trainer"].update(max_steps=12, val_check_interval=12, limit_val_batches=2, logger=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ResumableCheckpoint")]
    checkpoint["init_args"]["every_n_steps"] = 3
    config["trainer"]["callbacks"] += extra_callbacks
    config["model"].update(depth=1, width=32, heads=2, dropout=0.1, sample_length=0)
    config["data"]["init_args"].update(context_length=32, batch_size=4)
    path.write_text(yaml.safe_dump(config))
    return path


def _gpt_in_process(config: Path, *args: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        gpt_main(["fit", f"--config={config}", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill_9_of_the_default_config_then_ckpt_path_last_ends_with_equal_weights(tmp_path, monkeypatch):
    from test_checkpoint import HELPERS

    (tmp_path / "kill_helpers.py").write_text(HELPERS)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    pause = {"class_path": "kill_helpers.PauseAfterCheckpoint",
             "init_args": {"step": KILL_AT, "marker": str(killed / "marker")}}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    config = _default_config_sized_down(killed / "run.yaml", [pause])
    with open(killed / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "recipes/gpt.py"), "fit", f"--config={config}"],
                                   cwd=killed, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        monkeypatch.chdir(reference)  # the CLI writes config.yaml and runs/ into the working directory
        _gpt_in_process(_default_config_sized_down(reference / "run.yaml", []))
    finally:
        deadline = time.monotonic() + 240
        while not (killed / "marker").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        process.kill()  # SIGKILL: no handler, no finally, no flush
        process.wait()
    assert (killed / "marker").exists(), f"never reached the kill point:\n{(killed / 'log.txt').read_text()[-3000:]}"
    checkpoints = killed / "runs/gpt_stdlib/checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == KILL_AT
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0  # mid-epoch

    monkeypatch.chdir(killed)
    _gpt_in_process(_default_config_sized_down(killed / "resume.yaml", []), "--ckpt_path", "last")
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=True)
    expected = torch.load(reference / "runs/gpt_stdlib/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == 12
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for mine, theirs in zip(resumed["optimizer_states"][0]["state"].values(), expected["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
