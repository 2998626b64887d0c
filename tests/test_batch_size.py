"""`train.batch_size` and `train.micro_batch: auto`: the largest micro-batch that fits is
chosen, accumulation keeps the global batch, and resume keeps the choice. Running out of
memory is injected into the trial step, since the CPU gives no such signal."""

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
import yaml
from safetensors.torch import load_file

from sllm.errors import UserError
from sllm.run import load_latest
from sllm.train.batch_size import accumulation_steps, largest_fitting, power_of_two_sizes
from sllm.train.objectives import LanguageModeling
from sllm.train.trainer import Trainer, train

from .conftest import tiny_config

AUTO = ["train.micro_batch=auto", "train.batch_size=16"]


def _fail_above(monkeypatch, limit: int) -> list[int]:
    """Trial steps over `limit` sequences raise an OOM; returns the sizes tried."""
    tried: list[int] = []
    original = Trainer._trial_step

    def trial_step(self, micro_batch: int) -> None:
        tried.append(micro_batch)
        if micro_batch > limit:
            raise torch.OutOfMemoryError("injected: out of memory")
        original(self, micro_batch)

    monkeypatch.setattr(Trainer, "_trial_step", trial_step)
    return tried


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(load_latest(run_dir).path / "model.safetensors")


def test_candidates_are_powers_of_two_dividing_the_per_process_batch():
    assert power_of_two_sizes(24) == [1, 2, 4, 8]
    assert power_of_two_sizes(7) == [1]
    assert largest_fitting([1, 2, 4, 8], lambda size: size <= 4) == 4
    assert largest_fitting([1, 2], lambda size: False) == 0
    assert accumulation_steps(64, 8, 2) == 4
    with pytest.raises(UserError, match="not a multiple of the micro-batch 8"):
        accumulation_steps(36, 8, 1)


def test_largest_fitting_micro_batch_is_chosen_and_accumulation_keeps_the_batch(
    tmp_path, prepared_dir, monkeypatch
):
    tried = _fail_above(monkeypatch, 4)
    messages: list[str] = []
    result = train(tiny_config(prepared_dir, tmp_path / "auto", *AUTO, "train.max_steps=4"), messages.append)
    assert tried == [1, 2, 4, 8]  # doubling stops at the first failure
    assert "micro-batch auto: 4 sequences × 4 accumulation × 1 processes = 16 sequences per step" in messages
    assert result.tokens_seen == 4 * 16 * 32
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["train"]["micro_batch"] == "auto" and saved["train"]["batch_size"] == 16
    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    assert (plan["micro_batch"], plan["grad_accum"], plan["batch_size"]) == (4, 4, 16)
    assert load_latest(tmp_path / "auto").meta.micro_batch == 4


def test_search_leaves_no_trace_in_weights_or_optimizer(tmp_path, prepared_dir, monkeypatch):
    """The trial steps train the model; the run must start from the untouched initialization."""
    _fail_above(monkeypatch, 4)
    steps = ["train.max_steps=6", "model.dropout=0.1"]
    train(tiny_config(prepared_dir, tmp_path / "auto", *AUTO, *steps), log=lambda _: None)
    fixed = ["train.micro_batch=4", "train.grad_accum=4", *steps]
    train(tiny_config(prepared_dir, tmp_path / "fixed", *fixed), log=lambda _: None)
    auto, reference = _weights(tmp_path / "auto"), _weights(tmp_path / "fixed")
    for name in reference:
        assert torch.equal(auto[name], reference[name]), name


def test_not_even_one_sequence_fitting_is_one_clear_error(tmp_path, prepared_dir, monkeypatch):
    _fail_above(monkeypatch, 0)
    with pytest.raises(UserError) as error:
        train(tiny_config(prepared_dir, tmp_path / "run", *AUTO), log=lambda _: None)
    message = str(error.value)
    assert "one sequence of 32 tokens already runs out of memory on cpu" in message
    assert "\n" not in message


def test_resume_keeps_the_recorded_micro_batch(tmp_path, prepared_dir, monkeypatch):
    steps = [*AUTO, "train.max_steps=12", "train.checkpoint_interval=4", "train.eval_interval=4"]
    _fail_above(monkeypatch, 2)
    train(tiny_config(prepared_dir, tmp_path / "straight", *steps), log=lambda _: None)

    original_step = Trainer.train_step

    def stop_after_five(self):
        loss = original_step(self)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_step", stop_after_five)
    assert train(tiny_config(prepared_dir, tmp_path / "resumed", *steps), log=lambda _: None).step == 5
    monkeypatch.undo()
    tried = _fail_above(monkeypatch, 16)  # more would fit now; the run must not change its split
    assert train(tiny_config(prepared_dir, tmp_path / "resumed", *steps), log=lambda _: None).step == 12
    assert tried == []
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_cpu_candidates_are_capped_by_the_memory_estimate(tmp_path, prepared_dir, monkeypatch):
    cfg = tiny_config(prepared_dir, tmp_path / "run", *AUTO)
    trainer = Trainer(cfg, LanguageModeling(cfg), log=lambda _: None)
    monkeypatch.setattr("sllm.train.trainer.available_ram_bytes", lambda: 2 * trainer._estimated_bytes(2))
    trainer.settle_micro_batch()
    assert (trainer.plan.micro_batch, trainer.plan.grad_accum) == (2, 8)
    assert cfg.train.micro_batch == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.micro_batch=auto"], "needs train.batch_size"),
        (["train.batch_size=16", "train.grad_accum=2"], "not both"),
        (["train.batch_size=20", "train.micro_batch=8"], "multiple of train.micro_batch"),
        (["train.micro_batch=lots"], "must be one of int or 'auto'"),
        ([*AUTO, "train.parallel=fsdp"], "not available with train.parallel: fsdp"),
    ],
)
def test_inconsistent_batch_settings_are_refused(tmp_path, prepared_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(prepared_dir, tmp_path / "run", *overrides)


LAUNCHER = """
    import os, sys, torch
    from sllm.cli import main
    from sllm.train.trainer import Trainer

    limit = 2 if os.environ["RANK"] == "1" else 8
    original = Trainer._trial_step

    def trial_step(self, micro_batch):
        if micro_batch > limit:
            raise torch.OutOfMemoryError("injected")
        original(self, micro_batch)

    Trainer._trial_step = trial_step
    main(sys.argv[1:])
"""


def test_ranks_agree_on_the_smallest_fitting_micro_batch(tmp_path, prepared_dir):
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
        "train", "--data", str(prepared_dir), "--out", str(tmp_path / "run"), *AUTO,
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.max_steps=2",
        "train.device=cpu", "log.progress=false", "log.tensorboard=false", "log.samples_at_eval=false",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert (
        "micro-batch auto: 2 sequences × 4 accumulation × 2 processes = 16 sequences per step"
        in result.stdout
    )
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["micro_batch"] == 2


def test_find_batch_size_flag_keeps_the_configured_global_batch(tmp_path, prepared_dir, monkeypatch, capsys):
    from sllm.cli import main

    _fail_above(monkeypatch, 2)
    run_dir = tmp_path / "run"
    main(
        ["train", "--data", str(prepared_dir), "--out", str(run_dir), "--find-batch-size",
         "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "train.micro_batch=4", "train.grad_accum=3", "train.max_steps=2", "train.device=cpu",
         "log.progress=false", "log.tensorboard=false", "log.samples_at_eval=false"]
    )  # fmt: skip
    assert (
        "micro-batch auto: 2 sequences × 6 accumulation × 1 processes = 12 sequences per step"
        in capsys.readouterr().out
    )
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert (saved["micro_batch"], saved["batch_size"], saved["grad_accum"]) == ("auto", 12, 1)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["micro_batch"], plan["grad_accum"]) == (2, 6)
