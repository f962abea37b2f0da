"""Multi-node: the recipe on 2 "nodes" x 1 process (one torchrun per node) ends bit-identical to 1 node x 2 processes.

Both runs are the commands a user types, as subprocesses on 127.0.0.1 with gloo: the single node with Lightning's
own launcher (``--trainer.devices 2``), the two nodes with ``torchrun --nnodes 2 --node_rank 0/1`` and
``--trainer.num_nodes 2``. The SLURM script in ``docs/slurm/`` and the README's torchrun lines are parsed with the
recipe's CLI, so neither can drift from it.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_recipes.recipes.vit import main as vit_main

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docs/slurm/train_vit.sbatch"
STEPS = 4
TIMEOUT_S = 300  # for all three launches together; each takes ~30 s on 2 idle cores, mostly imports

# Written next to the runs and appended to the recipe's callbacks: what Lightning made of each process, and the
# initial weights (a run that did not train would compare equal too).
RECORDER = '''
import json, os
import lightning.pytorch as L
import torch


class RankRecorder(L.Callback):
    def on_train_start(self, trainer, pl_module):
        seen = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
                "world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "threads": torch.get_num_threads()}
        with open(os.path.join(trainer.default_root_dir, f"rank{trainer.global_rank}.json"), "w") as file:
            json.dump(seen, file)
        if trainer.is_global_zero:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, os.path.join(trainer.default_root_dir, "initial.pt"))
'''


def _fit_args(root: Path) -> list[str]:
    return [
        "fit",
        "--model.depth=1", "--model.width=32", "--model.heads=2", "--model.mlp_dim=32",
        f"--trainer.max_steps={STEPS}",
        "--trainer.limit_val_batches=1",  # the sanity check: one validation batch, metrics synced over the ranks
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        f"--trainer.default_root_dir={root}",  # ResumableCheckpoint writes <root>/checkpoints/last.ckpt at the end
        "--trainer.callbacks+=rank_recorder.RankRecorder",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(helpers: Path) -> dict[str, str]:
    # Nothing of an enclosing launcher may leak in: a SLURM_* variable would make Lightning pick SLURMEnvironment,
    # a RANK / WORLD_SIZE the torchelastic one.
    leaks = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    prefixes = ("SLURM_", "TORCHELASTIC_", "PL_")
    env = {k: v for k, v in os.environ.items() if k not in leaks and not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join([str(helpers), env.get("PYTHONPATH", "")])
    # One thread per process in both runs: the same kernels, so the same rounding (bit-identical results).
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 node x 2 processes and 2 nodes x 1 process, all started at once (they spend most of their time importing)."""
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "rank_recorder.py").write_text(RECORDER)
    env = _env(tmp)
    recipe = str(ROOT / "recipes/vit.py")
    port = _free_port()
    commands = {
        "1x2": [sys.executable, recipe, *_fit_args(tmp / "1x2"), "--trainer.devices=2"],
        **{
            f"2x1-node{node}": [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                "--master_addr=127.0.0.1", f"--master_port={port}",
                recipe, *_fit_args(tmp / "2x1"), "--trainer.num_nodes=2", "--trainer.devices=1",
            ]
            for node in (0, 1)
        },
    }  # fmt: skip
    processes, logs = {}, []
    started = time.perf_counter()
    try:
        for name, command in commands.items():
            logs.append(open(tmp / f"{name}.log", "w"))
            # A session of its own: on failure the whole tree (torchrun and its worker, Lightning's second process)
            # is killed with one signal.
            processes[name] = subprocess.Popen(
                command, cwd=tmp, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + TIMEOUT_S
        for name, process in processes.items():
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {TIMEOUT_S} s:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
    for name, process in processes.items():
        log = (tmp / f"{name}.log").read_text()
        assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{log[-3000:]}"
    return tmp, time.perf_counter() - started


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_lightning_saw_two_nodes_of_one_process_and_one_node_of_two(runs):
    tmp, _ = runs
    single, multi = _ranks(tmp / "1x2"), _ranks(tmp / "2x1")
    # (global rank, local rank, node rank): on one node the local ranks differ, on two nodes the node ranks.
    assert [(r["global_rank"], r["local_rank"], r["node_rank"]) for r in single] == [(0, 0, 0), (1, 1, 0)]
    assert [(r["global_rank"], r["local_rank"], r["node_rank"]) for r in multi] == [(0, 0, 0), (1, 0, 1)]
    assert {(r["world_size"], r["num_nodes"], r["threads"]) for r in single} == {(2, 1, 1)}
    assert {(r["world_size"], r["num_nodes"], r["threads"]) for r in multi} == {(2, 2, 1)}


@pytest.mark.slow
def test_two_nodes_end_bit_identical_to_one_node_of_two_processes(runs):
    tmp, seconds = runs
    single = torch.load(tmp / "1x2/checkpoints/last.ckpt", weights_only=True)
    multi = torch.load(tmp / "2x1/checkpoints/last.ckpt", weights_only=True)
    assert single["global_step"] == multi["global_step"] == STEPS
    initial = torch.load(tmp / "1x2/initial.pt", weights_only=True)
    other_initial = torch.load(tmp / "2x1/initial.pt", weights_only=True)
    assert initial.keys() == single["state_dict"].keys() == multi["state_dict"].keys()
    assert all(torch.equal(initial[k], other_initial[k]) for k in initial)
    moved = max(float((single["state_dict"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # it trained: the comparison below is not of untouched initial weights
    differ = {
        k: float((multi["state_dict"][k].double() - v.double()).abs().max())
        for k, v in single["state_dict"].items()
        if not torch.equal(multi["state_dict"][k], v)
    }
    assert not differ, f"weights differ (largest difference per tensor): {differ}"
    (mine,), (theirs,) = single["optimizer_states"], multi["optimizer_states"]
    assert mine["state"].keys() == theirs["state"].keys()
    for index, state in mine["state"].items():
        assert all(torch.equal(state[key], theirs["state"][index][key]) for key in state), index
    print(f"\n1 node x 2 processes and 2 nodes x 1 process, {STEPS} steps: bit-identical ({seconds:.0f} s for both)")


# ---------------------------------------------------------------------------------------- the documented commands


def _print_config(argv: list[str], capsys, monkeypatch) -> dict:
    """The recipe CLI's ``--print_config`` of ``argv`` (the arguments after ``recipes/vit.py``), run in this process."""
    monkeypatch.chdir(ROOT)  # the documented commands use paths relative to the repository root
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        vit_main([*argv, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    return yaml.safe_load(out)


def _sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", script, flags=re.M))


def _fake_slurm(tmp_path: Path, options: dict[str, str]) -> dict[str, str]:
    """The environment sbatch gives the script, with a fake srun (records its arguments, runs until released) and
    a fake scontrol (records its arguments) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": f'printf "%s\\0" "$@" > {tmp_path}/srun_argv\nwhile [ ! -e {tmp_path}/release ]; do sleep 0.05; done\n',
        "scontrol": f'echo "$@" >> {tmp_path}/scontrol_calls\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    nodes, tasks = options["nodes"], options["ntasks-per-node"]
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NNODES": nodes, "SLURM_JOB_NUM_NODES": nodes,
        "SLURM_NTASKS_PER_NODE": tasks, "SLURM_NTASKS": str(int(nodes) * int(tasks)),
        "SLURM_CPUS_PER_TASK": options["cpus-per-task"],
    }  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert process.poll() is None, f"script exited ({process.returncode}) before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after 30 s"
        time.sleep(0.05)


def test_the_sbatch_script_requeues_on_its_signal_and_waits_for_srun(tmp_path):
    script = SBATCH.read_text()
    options = _sbatch_options(script)
    assert int(options["nodes"]) >= 2 and options["gpus-per-node"] == options["ntasks-per-node"]  # a task per GPU
    # The signal goes to the batch shell only (B:): the training processes see nothing but the requeue's SIGTERM.
    assert options["signal"] == "B:USR1@120" and re.search(r"^#SBATCH\s+--requeue\b", script, flags=re.M)
    process = subprocess.Popen(["bash", str(SBATCH)], cwd=tmp_path, env=_fake_slurm(tmp_path, options),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "srun_argv", process, "srun")
        process.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the time limit
        _wait_for(tmp_path / "scontrol_calls", process, "scontrol")
        assert (tmp_path / "scontrol_calls").read_text() == "requeue 4242\n"
        process.send_signal(signal.SIGTERM)  # what the requeue sends to every process of the job
        time.sleep(0.5)
        assert process.poll() is None  # still waiting for srun: the training processes are saving
        (tmp_path / "release").touch()
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "requeueing job 4242" in out and "SIGTERM: waiting" in out


def test_the_sbatch_script_srun_command_line_is_one_the_recipe_accepts(tmp_path, capsys, monkeypatch):
    options = _sbatch_options(SBATCH.read_text())
    (tmp_path / "release").touch()  # the fake srun returns at once
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=_fake_slurm(tmp_path, options),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "srun_argv").read_text().split("\0")[:-1]
    start = argv.index("python")
    srun_options, (_, recipe, *args) = argv[:start], argv[start:]
    assert recipe == "recipes/vit.py" and f"--cpus-per-task={options['cpus-per-task']}" in srun_options

    config = _print_config(args, capsys, monkeypatch)
    trainer = config["trainer"]
    # What Lightning's SLURMEnvironment checks at start-up: devices = --ntasks-per-node, num_nodes = --nodes.
    assert trainer["num_nodes"] == int(options["nodes"]) and int(trainer["devices"]) == int(options["ntasks-per-node"])
    assert trainer["plugins"] == {
        "class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
        "init_args": {"auto_requeue": False, "requeue_signal": None},
    }
    # The resume recipe: a fixed checkpoint folder (ResumableCheckpoint in <default_root_dir>/checkpoints) and
    # --ckpt_path last from the first launch.
    assert config["ckpt_path"] == "last" and trainer["default_root_dir"] == "runs/vit_b16_imagenet"
    (resumable,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("ResumableCheckpoint")]
    assert resumable["init_args"]["dirpath"] is None and resumable["init_args"]["every_n_steps"] == 100
    assert config["data"]["init_args"]["num_workers"] == int(options["cpus-per-task"]) - 1


def _launcher_options(argv: list[str]) -> dict[str, str]:
    options, i = {}, 0
    while i < len(argv):
        key = argv[i].lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            i += 1
            value = argv[i]
        options[key.replace("-", "_")] = value
        i += 1
    return options


def test_the_readme_torchrun_commands_parse_and_agree_with_their_node_and_process_counts(capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Multi-node\n", 1)[1].split("\n## ", 1)[0]
    assert "docs/slurm/train_vit.sbatch" in section and SBATCH.is_file()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    commands = [line.split("#")[0].strip() for line in blocks.splitlines() if line.strip().startswith("torchrun")]
    assert len(commands) == 2  # node 0 and node 1
    node_ranks = []
    for command in commands:
        argv = shlex.split(command)
        recipe = argv.index("recipes/vit.py")
        launcher = _launcher_options(argv[1:recipe])
        node_ranks.append(launcher["node_rank"])
        config = _print_config(argv[recipe + 1 :], capsys, monkeypatch)
        assert config["trainer"]["num_nodes"] == int(launcher["nnodes"])
        assert int(config["trainer"]["devices"]) == int(launcher["nproc_per_node"])
        assert config["ckpt_path"] == "last" and config["trainer"]["default_root_dir"].startswith("/shared/")
        assert any(c["class_path"].endswith("ResumableCheckpoint") for c in config["trainer"]["callbacks"])
    assert node_ranks == ["0", "1"]
