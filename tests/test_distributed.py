"""DDP through torchrun (and `accelerate launch`) on the CPU (gloo): N processes equal one
process accumulating N micro-batches, and a dead rank makes the others fail instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllm.run import load_latest

STEPS = 12


def _train_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data_dir), "--out", str(run_dir),
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1",
        "train.micro_batch=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.lr=1e-2",
        "train.checkpoint_interval=6", "train.eval_interval=6", "train.eval_windows=4",
        "train.log_interval=1",
        "train.device=cpu", "log.progress=false", "log.tensorboard=false", "sample.max_new_tokens=4", *extra,
    ]  # fmt: skip


def _run(command: list[str], timeout: int = 180, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "sllm",
    ]


def _accelerate(nproc: int) -> list[str]:
    """`accelerate launch --multi_gpu` hands over to `torch.distributed.run` even without a GPU
    (its `--cpu` mode starts a single process unless MPI is set up)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
        "-m", "sllm",
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(load_latest(run_dir).path / "model.safetensors")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, prepared_dir) -> Path:
    """One process accumulating two micro-batches per step: the reference for two ranks."""
    run_dir = tmp_path_factory.mktemp("single") / "one"
    result = _run([sys.executable, "-m", "sllm", *_train_args(prepared_dir, run_dir, "train.grad_accum=2")])
    assert result.returncode == 0, result.stderr
    return run_dir


def _assert_runs_match(reference: Path, other: Path, check_losses: bool = True) -> None:
    if check_losses:
        one, two = _losses(reference), _losses(other)
        assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
        for step in one:
            assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    a, b = _weights(reference), _weights(other)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def _assert_two_processes_match(
    launch: list[str], run_dir: Path, prepared_dir: Path, reference: Path, *extra: str, **env_vars: str
) -> None:
    double = _run([*launch, *_train_args(prepared_dir, run_dir, *extra)], **env_vars)
    assert double.returncode == 0, double.stderr
    _assert_runs_match(reference, run_dir)
    assert double.stdout.count("val loss") == 1  # only rank 0 reports


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_accumulation(
    tmp_path, prepared_dir, single_process_run, parallel
):
    _assert_two_processes_match(
        _torchrun(2), tmp_path / "two", prepared_dir, single_process_run, f"train.parallel={parallel}"
    )


def test_accelerate_launch_runs_two_processes_like_torchrun(tmp_path, prepared_dir, single_process_run):
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    # A private HF_HOME keeps a user's `accelerate config` defaults out of the launch.
    _assert_two_processes_match(
        _accelerate(2), tmp_path / "two", prepared_dir, single_process_run, HF_HOME=str(tmp_path / "hf")
    )


def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path, prepared_dir, single_process_run):
    run_dir = tmp_path / "fsdp"
    first = _run([*_torchrun(2), *_train_args(prepared_dir, run_dir, "train.parallel=fsdp")])
    assert first.returncode == 0, first.stderr
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000012")  # as if it had stopped after step 6
    (checkpoints / "LATEST").write_text("step-000006\n")
    resumed = _run([sys.executable, "-m", "sllm", *_train_args(prepared_dir, run_dir, "train.grad_accum=2")])
    assert resumed.returncode == 0, resumed.stderr
    assert "step 6" in resumed.stdout
    _assert_runs_match(single_process_run, run_dir, check_losses=False)


def test_resume_on_two_processes_matches_uninterrupted(tmp_path, prepared_dir):
    straight = _run([*_torchrun(2), *_train_args(prepared_dir, tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "rolled-back"
    first = _run([*_torchrun(2), *_train_args(prepared_dir, run_dir, "train.checkpoint_interval=5")])
    assert first.returncode == 0, first.stderr
    checkpoints = run_dir / "checkpoints"
    for name in ("step-000010", "step-000012"):  # as if it had died just after step 5's checkpoint
        shutil.rmtree(checkpoints / name)
    (checkpoints / "LATEST").write_text("step-000005\n")
    resumed = _run([*_torchrun(2), *_train_args(prepared_dir, run_dir, "train.checkpoint_interval=5")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step 5" in resumed.stdout
    a, b = _weights(tmp_path / "straight"), _weights(run_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_killed_rank_makes_the_other_fail_instead_of_hanging(tmp_path, prepared_dir):
    args = _train_args(prepared_dir, tmp_path / "run", "train.max_steps=100000", "train.dist_timeout_s=30")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [*_torchrun(2), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1)
    workers = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    started = time.time()
    os.kill(int(workers[1]), signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.time() - started < 60
