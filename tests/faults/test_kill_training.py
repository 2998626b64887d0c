"""Training survives SIGKILL at random moments: resume equals the uninterrupted run bit for
bit, and no kill costs more than one checkpoint interval."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllm.run import load_latest

MAX_STEPS = 60


def _command(data_dir: Path, run_dir: Path, interval: int) -> list[str]:
    return [
        sys.executable, "-m", "sllm", "train", "--data", str(data_dir), "--out", str(run_dir),
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.micro_batch=8", f"train.max_steps={MAX_STEPS}", "train.warmup_steps=5", "train.lr=1e-2",
        f"train.checkpoint_interval={interval}", "train.eval_interval=20", "train.eval_windows=4",
        "train.log_interval=1", "train.keep_last=2", "train.device=cpu",
        "log.progress=false", "log.tensorboard=false", "sample.max_new_tokens=4",
    ]  # fmt: skip


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_latest(run_dir)
    assert checkpoint is not None and checkpoint.step == MAX_STEPS
    return load_file(checkpoint.path / "model.safetensors")


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill; the next start repairs the file
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for_training(process: subprocess.Popen, run_dir: Path, already: int) -> bool:
    """Block until this process has logged a new step; False if it exited first."""
    while process.poll() is None:
        steps = _logged_steps(run_dir)
        if steps and steps[-1] > already:
            return True
        time.sleep(0.01)
    return False


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_dir):
    """Reference runs, one per checkpoint interval used below."""
    runs = {}
    for interval in (1, 5):
        run_dir = tmp_path_factory.mktemp("straight") / f"every-{interval}"
        subprocess.run(
            _command(prepared_dir, run_dir, interval), check=True, capture_output=True, timeout=300
        )
        runs[interval] = _weights(run_dir)
    return runs


@pytest.mark.parametrize(("seed", "interval"), [(1, 5), (2, 1)])
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(
    tmp_path, prepared_dir, uninterrupted, seed, interval
):
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    kills, lost = 0, []
    while kills < 3:
        latest = load_latest(run_dir)
        resumed_from = latest.step if latest else 0
        process = subprocess.Popen(
            _command(prepared_dir, run_dir, interval), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if _wait_for_training(process, run_dir, resumed_from):
            time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            process.communicate()
            break
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kills += 1
        last_logged = max(_logged_steps(run_dir))
        after = load_latest(run_dir)
        lost.append(last_logged - (after.step if after else 0))
    latest = load_latest(run_dir)
    if latest is None or latest.step < MAX_STEPS:
        finish = subprocess.run(_command(prepared_dir, run_dir, interval), capture_output=True, timeout=300)
        assert finish.returncode == 0, finish.stderr
    assert kills >= 2
    print(f"\nseed {seed}, checkpoint every {interval}: {kills} kills, steps lost per kill {lost}")
    assert max(lost) <= interval, lost
    _assert_same_weights(_weights(run_dir), uninterrupted[interval])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, MAX_STEPS + 1))


def test_sigkill_during_a_checkpoint_write(tmp_path, prepared_dir, uninterrupted):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        _command(prepared_dir, run_dir, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    checkpoints = run_dir / "checkpoints"
    caught = None
    while process.poll() is None and caught is None:
        if checkpoints.is_dir():
            caught = next(
                (p for p in checkpoints.iterdir() if ".tmp-" in p.name and p.name != ".LATEST"), None
            )
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert caught is not None, "the writer finished before a checkpoint write was seen"
    assert load_latest(run_dir) is None or load_latest(run_dir).step >= 0  # every complete one verifies
    finish = subprocess.run(_command(prepared_dir, run_dir, 1), capture_output=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    _assert_same_weights(_weights(run_dir), uninterrupted[1])


def test_second_signal_exits_at_once(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, time
        from sllm.train.signals import StopRequest
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            print("first:", stop.signal_name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("survived the second signal", flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "first: SIGINT" in result.stdout
    assert "survived" not in result.stdout
    assert result.returncode == -signal.SIGINT
