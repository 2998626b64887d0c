"""Metric sinks: W&B through a stand-in module that records what sllm asks of it."""

import sys
import types

import pytest

from sllm.errors import UserError
from sllm.train.trainer import train

from .conftest import tiny_config


class _Recorder:
    def __init__(self):
        self.inits, self.logs, self.artifacts, self.finished = [], [], [], 0

    def module(self) -> types.ModuleType:
        recorder = self
        wandb = types.ModuleType("wandb")
        wandb.util = types.SimpleNamespace(generate_id=lambda: "run123")

        class Run:
            def log(self, metrics, step):
                recorder.logs.append((step, metrics))

            def log_artifact(self, artifact):
                recorder.artifacts.append(artifact)

            def finish(self):
                recorder.finished += 1

        class Artifact:
            def __init__(self, name, type):
                self.name, self.type, self.paths = name, type, []

            def add_file(self, path):
                self.paths.append(path)

            def add_dir(self, path, name):
                self.paths.append(path)

        def init(**kwargs):
            recorder.inits.append(kwargs)
            return Run()

        wandb.init, wandb.Artifact, wandb.Html = init, Artifact, lambda text: text
        return wandb


def test_wandb_gets_metrics_samples_and_artifacts_and_resumes_the_same_run(
    tmp_path, prepared_dir, monkeypatch
):
    recorder = _Recorder()
    monkeypatch.setitem(sys.modules, "wandb", recorder.module())
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=20", "log.wandb=true"), log=lambda _: None)
    assert recorder.inits[0]["id"] == "run123" and recorder.inits[0]["resume"] == "allow"
    assert recorder.inits[0]["config"]["model"]["n_layer"] == 2
    steps_with_loss = [step for step, metrics in recorder.logs if "loss" in metrics]
    assert steps_with_loss == [5, 10, 15, 20]
    assert any("samples" in metrics for _, metrics in recorder.logs)
    assert [(a.name, a.type) for a in recorder.artifacts] == [
        ("tokenizer", "tokenizer"), ("config", "config"), ("final", "model"), ("best", "model"),
    ]  # fmt: skip
    assert recorder.finished == 1

    train(tiny_config(prepared_dir, run_dir, "train.max_steps=30", "log.wandb=true"), log=lambda _: None)
    assert recorder.inits[1]["id"] == "run123"


def test_wandb_missing_is_a_clear_error(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny_config(prepared_dir, tmp_path / "run", "log.wandb=true"), log=lambda _: None)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
