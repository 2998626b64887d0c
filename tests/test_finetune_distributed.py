"""SFT through torchrun on the CPU (gloo): two processes train what one process accumulating
two micro-batches trains, as pre-training does (tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllm.run import load_latest


def _sft(launch: list[str], trained_run: Path, data: Path, out: Path, *extra: str) -> str:
    """`sllm finetune sft` as a user types it; `--base` names the base run, since torchrun's own
    parser would take `--run` for its `--run-path`."""
    args = [
        "-m", "sllm", "finetune", "sft", "--base", str(trained_run), "--data", str(data), "--out", str(out),
        "sft.epochs=2", "sft.batch_size=4", "sft.lr=1e-3", "sft.val_ratio=0.1", "sft.max_new_tokens=4",
        "sft.device=cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sft_on_two_processes_equals_one_process_with_accumulation(tmp_path, trained_run, parallel):
    data = tmp_path / "qa.csv"
    pairs = [("대한민국은?", "민주공화국이다"), ("주권은?", "국민에게 있다"), ("수도는?", "서울이다")]
    data.write_text("Q,A\n" + "\n".join(f"{q},{a}" for q, a in pairs * 8), "utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    _sft([sys.executable], trained_run, data, one, "sft.micro_batch=2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    output = _sft(torchrun, trained_run, data, two, f"sft.parallel={parallel}")
    assert output.count("saved to") == 1  # only rank 0 reports

    plans = [json.loads((run / "plan.json").read_text()) for run in (one, two)]
    assert [(p["micro_batch"], p["grad_accum"], p["world_size"]) for p in plans] == [(2, 2, 1), (2, 1, 2)]
    losses_one, losses_two = _losses(one), _losses(two)
    assert sorted(losses_one) == sorted(losses_two) and len(losses_one) >= 2
    for step, loss in losses_one.items():
        assert abs(loss - losses_two[step]) < 1e-5, (step, loss, losses_two[step])
    reference = load_file(load_latest(one).path / "model.safetensors")
    weights = load_file(load_latest(two).path / "model.safetensors")
    # Under FSDP the key bias, whose gradient is zero in exact arithmetic (softmax ignores a
    # shift of all scores), gets another rounding noise from the sharded reduction, and Adam
    # scales noise to lr-sized steps: 2e-4 measured at lr 1e-3.
    tolerance = 1e-5 if parallel == "ddp" else 1e-3
    for name in reference:
        torch.testing.assert_close(reference[name], weights[name], rtol=0, atol=tolerance)
