"""Metric sinks: Weights & Biases through the real `wandb` package in offline mode."""

import sys
from pathlib import Path

import pytest

from sllm.errors import UserError
from sllm.run import WANDB_ID_FILE
from sllm.train.trainer import train

from .conftest import tiny_config


def _offline_wandb(monkeypatch, home: Path) -> None:
    """The real wandb package, offline, with every directory it writes under `home`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(home / name.lower()))


def test_real_wandb_offline_records_config_metrics_samples_and_artifacts_and_resumes_the_same_run(
    tmp_path, prepared_dir, monkeypatch
):
    pytest.importorskip("wandb")
    _offline_wandb(monkeypatch, tmp_path / "wandb-home")
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=20", "log.wandb=true"), log=lambda _: None)

    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = first.read_bytes()
    for expected in (b'"n_layer":2', b"loss", b"val_loss", b"samples", b"tokenizer.json", b"config.yaml"):
        assert expected in records, expected
    for artifact in (b"tokenizer", b"final", b"best", b"model.safetensors"):
        assert artifact in records, artifact
    staged = {
        path.read_bytes() for path in (tmp_path / "wandb-home" / "data_dir").rglob("*") if path.is_file()
    }
    assert (run_dir / "tokenizer.json").read_bytes() in staged
    assert (run_dir / "checkpoints" / "step-000020" / "model.safetensors").read_bytes() in staged

    train(tiny_config(prepared_dir, run_dir, "train.max_steps=30", "log.wandb=true"), log=lambda _: None)
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same W&B run, resumed


def test_wandb_missing_is_a_clear_error(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny_config(prepared_dir, tmp_path / "run", "log.wandb=true"), log=lambda _: None)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
