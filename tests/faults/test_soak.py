"""A long small run: disk use stays bounded by keep_last and memory does not grow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sllm.train.trainer import Trainer, train

from ..conftest import tiny_config

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_thousand_steps_keep_disk_and_memory_flat(tmp_path, prepared_dir, monkeypatch):
    samples: list[tuple[int, int]] = []
    disk: list[int] = []
    original = Trainer.train_step

    def measured_step(self):
        loss = original(self)
        if self.step % 50 == 0:
            samples.append((self.step, _rss_bytes()))
            disk.append(_dir_bytes(self.run_dir / "checkpoints"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", measured_step)
    run_dir = tmp_path / "soak"
    cfg = tiny_config(
        prepared_dir, run_dir, "model.n_layer=1", "model.n_embd=32", "model.block_size=16",
        "train.micro_batch=4", "train.max_steps=2000", "train.checkpoint_interval=50",
        "train.keep_last=3", "train.eval_interval=500", "train.log_interval=10",
    )  # fmt: skip
    assert train(cfg, log=lambda _: None).step == 2000

    steps = np.array([s for s, _ in samples if s >= 500], dtype=float)
    rss_mb = np.array([r for s, r in samples if s >= 500], dtype=float) / 1e6
    slope_mb_per_1000_steps = np.polyfit(steps, rss_mb, 1)[0] * 1000
    print(f"RSS slope after warm-up: {slope_mb_per_1000_steps:+.3f} MB per 1000 steps; ", end="")
    print(f"RSS {rss_mb[0]:.1f} → {rss_mb[-1]:.1f} MB; checkpoints at most {max(disk) / 1e6:.2f} MB")
    assert slope_mb_per_1000_steps < 2.0, slope_mb_per_1000_steps

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-001900", "step-001950", "step-002000"]
    one_checkpoint = _dir_bytes(checkpoints / "step-002000")
    assert max(disk) <= 5 * one_checkpoint  # 3 kept + best + the one being written
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, 2001, 10))
