import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllm.errors import UserError
from sllm.run import load_latest, verify_checkpoint
from sllm.train.trainer import Trainer, train

from .conftest import tiny_config


def _quiet(_):
    pass


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_well_below_its_start(trained_run):
    losses = [m["loss"] for m in _metrics(trained_run) if "loss" in m]
    assert losses[0] > 6.0  # ~ln(512) at init
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0
    val = [m["val_loss"] for m in _metrics(trained_run) if "val_loss" in m]
    assert val[-1] < val[0]
    assert val[-1] < math.log(512) - 1.0


def test_finished_run_has_run_dir_layout(trained_run):
    checkpoints = trained_run / "checkpoints"
    assert (checkpoints / "LATEST").read_text().strip() == "step-000120"
    assert verify_checkpoint(checkpoints / "step-000120").step == 120
    assert verify_checkpoint(checkpoints / "best").meta.val_loss is not None
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert kept == ["step-000060", "step-000090", "step-000120"]  # keep_last=3
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert (trained_run / name).is_file()
    assert (trained_run / "samples" / "step-000120.md").read_text().startswith("# Samples at step 120")


def test_same_command_again_says_already_finished(trained_run, prepared_dir):
    messages: list[str] = []
    result = train(tiny_config(prepared_dir, trained_run, "train.max_steps=120"), log=messages.append)
    assert result.already_finished and result.step == 120
    assert any("already finished" in m for m in messages)


def _interrupt_at(monkeypatch, step: int) -> None:
    """Send a real SIGTERM to this process right after the given step."""
    original = Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("options", [[], ["model.dropout=0.1", "train.grad_accum=2"], ["train.dtype=bf16"]])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, prepared_dir, monkeypatch, options):
    steps = ["train.max_steps=24", "train.checkpoint_interval=8", "train.eval_interval=8", *options]
    train(tiny_config(prepared_dir, tmp_path / "straight", *steps), log=_quiet)

    _interrupt_at(monkeypatch, 13)
    first = train(tiny_config(prepared_dir, tmp_path / "resumed", *steps), log=_quiet)
    assert first.stopped_by == "SIGTERM" and first.step == 13
    monkeypatch.undo()
    second = train(tiny_config(prepared_dir, tmp_path / "resumed", *steps), log=_quiet)
    assert second.step == 24

    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert straight[name].dtype == torch.float32  # bf16 autocast keeps fp32 weights
        assert torch.equal(straight[name], resumed[name]), name
    losses = {m["step"]: m["loss"] for m in _metrics(tmp_path / "straight") if "loss" in m}
    resumed_losses = {m["step"]: m["loss"] for m in _metrics(tmp_path / "resumed") if "loss" in m}
    assert resumed_losses[20] == losses[20]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_a_loadable_checkpoint_and_exits_zero(tmp_path, prepared_dir, signum):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "sllm", "train", "--data", str(prepared_dir), "--out", str(run_dir),
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.max_steps=100000", "train.checkpoint_interval=100000", "train.eval_interval=7",
        "train.log_interval=1", "train.device=cpu", "log.progress=false", "log.tensorboard=false",
        "log.samples_at_eval=false",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and "val_loss" in metrics.read_text()):
        time.sleep(0.1)  # stopped after an evaluation, so there are scores to report
    time.sleep(0.3)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"{signal.Signals(signum).name} received" in stdout
    checkpoint = load_latest(run_dir)
    assert checkpoint is not None and checkpoint.step > 0
    assert checkpoint.step >= max(m["step"] for m in _metrics(run_dir))
    assert "Traceback" not in stderr
    evaluated = [m for m in _metrics(run_dir) if "val_loss" in m][-1]  # the scores it reports are these
    assert checkpoint.meta.val_step == evaluated["step"] == 7 * (checkpoint.step // 7)
    last_line = stdout.strip().splitlines()[-1]
    scores = f"val loss {evaluated['val_loss']:.4f}"
    if evaluated["step"] == checkpoint.step:
        assert last_line.startswith(f"step {checkpoint.step}: {scores}")
    else:
        assert last_line.startswith(
            f"step {checkpoint.step}: last evaluated at step {evaluated['step']}: {scores}"
        )


def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, prepared_dir, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=20"), log=_quiet)
    weights = run_dir / "checkpoints" / "step-000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    checkpoint = load_latest(run_dir)
    assert checkpoint.step == 10
    assert "step-000020 is damaged" in capsys.readouterr().err


def test_resume_with_another_model_shape_is_refused(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=10"), log=_quiet)
    with pytest.raises(UserError, match=r"n_layer: 2 → 3"):
        train(tiny_config(prepared_dir, run_dir, "train.max_steps=20", "model.n_layer=3"), log=_quiet)
    assert load_latest(run_dir).step == 10


def test_resume_with_another_optimizer_is_one_line_and_keeps_the_checkpoint(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=4", "train.checkpoint_interval=4"), log=_quiet)
    saved = (run_dir / "checkpoints" / "step-000004" / "model.safetensors").read_bytes()
    for optimizer in ("muon", "adafactor"):
        with pytest.raises(
            UserError, match=rf"trained with train.optimizer=adamw, not {optimizer}; resume with"
        ):
            train(
                tiny_config(prepared_dir, run_dir, "train.max_steps=8", f"train.optimizer={optimizer}"),
                log=_quiet,
            )
    meta = json.loads((run_dir / "checkpoints" / "step-000004" / "meta.json").read_text())
    del meta["optimizer"]  # a checkpoint from before the meta recorded it
    (run_dir / "checkpoints" / "step-000004" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"optimizer state in .* does not fit train.optimizer=adafactor"):
        train(
            tiny_config(prepared_dir, run_dir, "train.max_steps=8", "train.optimizer=adafactor"), log=_quiet
        )
    assert (run_dir / "checkpoints" / "step-000004" / "model.safetensors").read_bytes() == saved


def test_resume_says_when_the_batch_or_the_schedule_changed(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=4", "train.checkpoint_interval=4"), log=_quiet)
    lines = []
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=6", "train.grad_accum=2"), log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 2
    assert "tokens per step where the run had" in notes[0] and "train.batch_size" in notes[0]
    assert notes[1].startswith("note: train.max_steps is 6 where the run had 4")


def test_block_size_larger_than_data_is_explained(tmp_path, prepared_dir):
    from sllm.config import load_config

    with pytest.raises(UserError, match="train.block_size"):
        load_config(None, ["model.block_size=32", "train.block_size=64"])
    cfg = tiny_config(prepared_dir, tmp_path / "r", "model.block_size=100000")
    with pytest.raises(UserError, match="fewer than block_size"):
        train(cfg, log=_quiet)


def test_tensorboard_events_are_written_when_installed(tmp_path, prepared_dir):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=10", "log.tensorboard=true"), log=_quiet)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert "loss" in events.Tags()["scalars"] and "val_loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("loss")] == [5, 10]


def test_token_and_epoch_budgets_set_the_step_count(tmp_path, prepared_dir):
    tokens_per_step = 8 * 32  # micro_batch × block_size
    result = train(tiny_config(prepared_dir, tmp_path / "tokens", "train.max_tokens=2600"), log=_quiet)
    assert result.step == 11 and result.tokens_seen == 11 * tokens_per_step
    train_tokens = json.loads((prepared_dir / "meta.json").read_text())["splits"]["train"]["tokens"]
    run_dir = tmp_path / "epochs"
    result = train(tiny_config(prepared_dir, run_dir, "train.epochs=0.5", "train.log_interval=1"), log=_quiet)
    assert result.step == math.ceil(0.5 * train_tokens / tokens_per_step)
    last = [m for m in _metrics(run_dir) if "epoch" in m][-1]
    assert last["epoch"] == pytest.approx(result.tokens_seen / train_tokens)
    assert 0.5 <= last["epoch"] < 0.5 + tokens_per_step / train_tokens


def test_init_from_starts_with_another_runs_weights(tmp_path, prepared_dir, trained_run):
    source = _final_weights(trained_run)
    cfg = tiny_config(
        prepared_dir, tmp_path / "domain", "train.max_steps=1", "train.lr=1e-9", "train.min_lr=0"
    )
    cfg.train.init_from = str(trained_run)
    train(cfg, log=_quiet)
    started = _final_weights(tmp_path / "domain")
    for name in source:
        torch.testing.assert_close(started[name], source[name], atol=1e-6, rtol=0)
    bigger = tiny_config(prepared_dir, tmp_path / "other", "model.n_layer=3")
    bigger.train.init_from = str(trained_run)
    with pytest.raises(
        UserError, match=r"train.init_from: .* made for another model \(n_layer: 2 → 3\); set those"
    ):
        train(bigger, log=_quiet)
    data_vocab = json.loads((prepared_dir / "meta.json").read_text())["vocab_size"]  # cfg keeps its 0
    wider = tiny_config(prepared_dir, tmp_path / "wider", f"model.vocab_size={data_vocab + 8}")
    wider.train.init_from = str(trained_run)
    with pytest.raises(UserError, match=r"vocab_size: .*; prepare the data with `--tokenizer .*` and leave"):
        train(wider, log=_quiet)


def test_a_diverged_run_stops_with_a_user_error_and_keeps_its_last_good_checkpoint(tmp_path, prepared_dir):
    run = tmp_path / "run"
    steps = [
        "train.max_steps=8",
        "train.checkpoint_interval=4",
        "train.eval_interval=4",
        "train.log_interval=1",
    ]
    train(tiny_config(prepared_dir, run, *steps), log=_quiet)
    good = _final_weights(run)
    diverging = [*steps, "train.max_steps=40", "train.lr=1e4", "train.min_lr=0", "train.grad_clip=0"]
    with pytest.raises(
        UserError, match=r"training diverged by step \d+: .*\(step-000008\) was saved\. Lower train\.lr"
    ):
        train(tiny_config(prepared_dir, run, *diverging), log=_quiet)
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000008"
    assert all(torch.equal(good[name], tensor) for name, tensor in _final_weights(run).items())


def test_weights_broken_by_the_last_update_are_never_saved(tmp_path, prepared_dir, monkeypatch):
    original = Trainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))  # the loss of this step was fine
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="by step 3: its weights are no longer finite numbers.*none yet"):
        train(tiny_config(prepared_dir, run, "train.max_steps=6", "train.checkpoint_interval=3"), log=_quiet)
    assert not (run / "checkpoints" / "LATEST").exists()
