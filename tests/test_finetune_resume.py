"""Fine-tuning resumes exactly: SFT and STS killed with SIGKILL mid-run, then started again with
the same command, end with the same weights, bit for bit, as runs that were never interrupted;
SIGTERM saves and exits 0; `sllm queue` and `sllm report` take fine-tuning runs too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllm.run import load_latest

from .test_sts import sllm, write_sts_tsv

KILL_AT_STEP = 5  # checkpoints every 2 steps: step 4 is saved, step 5 is lost to the kill
KILLER = """
    import os, signal, sys
    from sllm.cli import main
    from sllm.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    Trainer.train_step = train_step
    main(sys.argv[1:])
"""


def _killed(tmp_path: Path, *args) -> None:
    """The command in a process that SIGKILLs itself right after step KILL_AT_STEP."""
    launcher = tmp_path / "killer.py"
    launcher.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": str(KILL_AT_STEP)}
    command = [sys.executable, str(launcher), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(load_latest(run_dir).path / "model.safetensors")


def _assert_resume_equals_uninterrupted(tmp_path: Path, command: list) -> int:
    """Runs `command` straight and killed-then-resumed; returns the run's step count."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = sllm(*command, "--out", straight)
    assert result.returncode == 0, result.stderr
    total_steps = json.loads((straight / "plan.json").read_text())["max_steps"]
    _killed(tmp_path, *command, "--out", resumed)
    assert load_latest(resumed).step == KILL_AT_STEP - 1
    result = sllm(*command, "--out", resumed)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {resumed}" in result.stdout and f"step {KILL_AT_STEP - 1}" in result.stdout
    assert load_latest(resumed).step == load_latest(straight).step == total_steps
    reference, weights = _final_weights(straight), _final_weights(resumed)
    assert reference.keys() == weights.keys()
    for name in reference:
        assert torch.equal(reference[name], weights[name]), name
    assert _logged(resumed) == _logged(straight)  # the steps replayed after the kill are logged once
    return total_steps


def _logged(run_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_sft_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, trained_run):
    data = tmp_path / "qa.csv"
    pairs = [("대한민국은?", "민주공화국이다"), ("주권은?", "국민에게 있다"), ("수도는?", "서울이다")]
    data.write_text("Q,A\n" + "\n".join(f"{q},{a}" for q, a in pairs * 8), "utf-8")
    settings = [
        "sft.epochs=3", "sft.batch_size=2", "sft.micro_batch=1", "sft.lr=1e-3", "sft.val_ratio=0.1",
        "sft.checkpoint_interval=2", "sft.max_new_tokens=4", "sft.device=cpu",
    ]  # fmt: skip
    command = ["finetune", "sft", "--run", trained_run, "--data", data, *settings]
    assert _assert_resume_equals_uninterrupted(tmp_path, command) > KILL_AT_STEP + 2


@pytest.mark.parametrize("freeze", ["false", "true"])
def test_sts_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, trained_run, freeze):
    train = write_sts_tsv(tmp_path / "train.tsv", 60, seed=1)
    dev = write_sts_tsv(tmp_path / "dev.tsv", 30, seed=2)
    command = [
        "finetune", "sts", "--run", trained_run, "--train", train, "--dev", dev, "sts.epochs=3",
        "sts.batch_size=16", "sts.max_length=32", "sts.checkpoint_interval=2", "sts.device=cpu",
        f"sts.freeze={freeze}",
    ]  # fmt: skip
    assert _assert_resume_equals_uninterrupted(tmp_path, command) == 3 * 4  # 60 pairs: 4 steps an epoch


def test_queue_runs_a_fine_tuning_once_and_report_reads_it(tmp_path, trained_run):
    train = write_sts_tsv(tmp_path / "train.tsv", 40, seed=1)
    dev = write_sts_tsv(tmp_path / "dev.tsv", 20, seed=2)
    out = tmp_path / "sts"
    queue = tmp_path / "queue.txt"
    queue.write_text(
        f"finetune sts --run {trained_run} --train {train} --dev {dev} --out {out} "
        "sts.epochs=2 sts.batch_size=16 sts.max_length=32 sts.device=cpu\n"
    )
    for expected in ("done", "skipped: finished before"):
        result = sllm("queue", queue)
        assert result.returncode == 0, result.stderr
        status = json.loads((tmp_path / "queue.txt.status.json").read_text())
        assert [s["status"] for s in status] == [expected]
    pytest.importorskip("matplotlib")
    result = sllm("report", out, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "plots" / "loss.png").is_file()


def test_sigterm_during_sft_saves_and_the_same_settings_finish(tmp_path, trained_run, monkeypatch):
    from sllm.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    data = tmp_path / "qa.csv"
    data.write_text(
        "Q,A\n" + "\n".join(["대한민국은?,민주공화국이다", "주권은?,국민에게 있다"] * 10), "utf-8"
    )
    out = tmp_path / "sft"
    command = ["finetune", "sft", "--run", trained_run, "--data", data, "--out", out, "sft.epochs=2",
               "sft.batch_size=2", "sft.val_ratio=0.1", "sft.max_new_tokens=4", "sft.device=cpu"]  # fmt: skip
    monkeypatch.setattr(Trainer, "train_step", train_step)
    stopped = sllm(*command)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM received: saved step 3" in stopped.stdout and load_latest(out).step == 3
    monkeypatch.undo()
    refused = sllm(*command, "sft.lr=1e-2")  # another run, not this one resumed
    assert refused.returncode == 2 and "other settings" in refused.stderr
    finished = sllm(*command, "sft.keep_last=3")  # how it runs may change, not what it trains
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stdout and load_latest(out).step > 3
