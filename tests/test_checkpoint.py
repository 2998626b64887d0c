"""Checkpoint safety: hashes, fallback, safe loading, disk full, leftovers of crashes."""

import errno
import json
import os
import shutil

import pytest
import torch

from sllm.errors import UserError
from sllm.run import Checkpoint, load_latest, read_run_config, sha256_file, verify_checkpoint
from sllm.train import checkpoint as ckpt
from sllm.train.checkpoint import clean_leftovers
from sllm.train.trainer import train

from .conftest import tiny_config


def _quiet(_):
    pass


@pytest.fixture
def run_with_two_checkpoints(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, "train.max_steps=20"), log=_quiet)
    return run_dir


def test_truncated_meta_json_falls_back_with_warning(run_with_two_checkpoints, capsys):
    meta = run_with_two_checkpoints / "checkpoints" / "step-000020" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    assert load_latest(run_with_two_checkpoints).step == 10
    assert "meta.json unreadable" in capsys.readouterr().err


def test_missing_weights_fall_back_and_all_damaged_is_an_error(run_with_two_checkpoints):
    checkpoints = run_with_two_checkpoints / "checkpoints"
    (checkpoints / "step-000020" / "model.safetensors").unlink()
    assert load_latest(run_with_two_checkpoints).step == 10
    (checkpoints / "step-000010" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no checkpoint .* verifies"):
        load_latest(run_with_two_checkpoints)


def test_malicious_pickle_in_state_is_refused_without_running(tmp_path, run_with_two_checkpoints):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = run_with_two_checkpoints / "checkpoints" / "step-000020"
    torch.save({"optimizer": Payload(), "step": 20}, target / "state.pt")
    meta = json.loads((target / "meta.json").read_text())
    meta["files"]["state.pt"] = sha256_file(target / "state.pt")  # an attacker controls the hashes too
    (target / "meta.json").write_text(json.dumps(meta))

    checkpoint = verify_checkpoint(target)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        checkpoint.train_state()
    assert not marker.exists()
    with pytest.raises(UserError, match="cannot be loaded safely"):
        train(_resume_config(run_with_two_checkpoints), log=_quiet)
    assert not marker.exists()


def _resume_config(run_dir):
    cfg = read_run_config(run_dir)
    cfg.train.max_steps = 30
    return cfg


def test_disk_full_during_write_keeps_previous_checkpoint(tmp_path, prepared_dir, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny_config(prepared_dir, run_dir, "train.max_steps=30", "train.keep_last=1")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # step 10 and best/ succeed, step 20 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(
        UserError,
        match=r"the disk is full \(No space left on device\): cannot write the checkpoint step-000020 in",
    ):
        train(cfg, log=_quiet)
    monkeypatch.undo()
    assert load_latest(run_dir).step == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["LATEST", "best", "step-000010"]
    assert (
        train(tiny_config(prepared_dir, run_dir, "train.max_steps=30", "train.keep_last=1"), log=_quiet).step
        == 30
    )


def test_free_space_is_checked_before_writing(tmp_path, prepared_dir, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(UserError, match=r"the disk is full .* \(need [\d.,]+ MB, 0.0 MB free\)"):
        train(tiny_config(prepared_dir, tmp_path / "run", "train.max_steps=10"), log=_quiet)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_crash_between_renames_of_best_is_recovered(run_with_two_checkpoints):
    checkpoints = run_with_two_checkpoints / "checkpoints"
    aside = checkpoints / f".best.old-{os.getpid() + 1}"
    os.replace(checkpoints / "best", aside)  # killed after moving the old one aside
    (checkpoints / ".step-000030.tmp-99999").mkdir()  # and a half-written checkpoint
    clean_leftovers(run_with_two_checkpoints)
    assert isinstance(verify_checkpoint(checkpoints / "best"), Checkpoint)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["LATEST", "best", "step-000010", "step-000020"]


def test_unwritable_run_dir_is_a_user_error(prepared_dir):
    with pytest.raises(UserError, match="cannot write the run directory to /proc/sllm-run"):
        train(tiny_config(prepared_dir, "/proc/sllm-run"), log=_quiet)


# 256 tokens per step (micro_batch 8 × block 32): epochs of 1000 tokens end at steps 4, 8, 12.
BY_EPOCH = ("train.checkpoint_every=epoch", "train.tokens_per_epoch=1000")


def _periodic(run_dir) -> dict[str, int]:
    """Periodic checkpoint directories by name, with the step each records."""
    found = (run_dir / "checkpoints").glob("*-*")
    return {p.name: verify_checkpoint(p).step for p in found if not p.name.startswith(".")}


def test_epoch_checkpoints_are_named_by_epoch_and_resume_like_the_uninterrupted_run(tmp_path, prepared_dir):
    straight = tmp_path / "straight"
    train(tiny_config(prepared_dir, straight, *BY_EPOCH, "train.epochs=3"), log=_quiet)
    assert _periodic(straight) == {"epoch-0001": 4, "epoch-0002": 8, "epoch-0003": 12}
    assert (straight / "checkpoints" / "LATEST").read_text() == "epoch-0003\n"

    rolled_back = tmp_path / "rolled-back"
    train(tiny_config(prepared_dir, rolled_back, *BY_EPOCH, "train.epochs=3"), log=_quiet)
    checkpoints = rolled_back / "checkpoints"
    for name in ("epoch-0002", "epoch-0003"):  # as if it had died during epoch 2
        shutil.rmtree(checkpoints / name)
    (checkpoints / "LATEST").write_text("epoch-0001\n")
    messages: list[str] = []
    train(tiny_config(prepared_dir, rolled_back, *BY_EPOCH, "train.epochs=3"), log=messages.append)
    assert any(m.startswith("resumed from") and "epoch-0001 (step 4," in m for m in messages)
    assert _periodic(rolled_back) == _periodic(straight)
    a, b = load_latest(straight).model_state(), load_latest(rolled_back).model_state()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_retention_and_fallback_order_epoch_and_step_checkpoints_by_step(tmp_path, prepared_dir, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(prepared_dir, run_dir, *BY_EPOCH, "train.max_steps=6", "train.keep_last=2"), log=_quiet)
    assert _periodic(run_dir) == {"epoch-0001": 4, "step-000006": 6}  # the run ends mid-epoch
    train(tiny_config(prepared_dir, run_dir, *BY_EPOCH, "train.max_steps=9", "train.keep_last=2"), log=_quiet)
    assert _periodic(run_dir) == {"epoch-0002": 8, "step-000009": 9}  # step 6 was the oldest
    weights = run_dir / "checkpoints" / "step-000009" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert load_latest(run_dir).path.name == "epoch-0002"
    assert "step-000009 is damaged" in capsys.readouterr().err


def test_checkpoint_weights_get_the_same_file_mode_as_other_files(trained_run):
    checkpoint = trained_run / "checkpoints" / "step-000120"
    modes = {path.name: path.stat().st_mode & 0o777 for path in checkpoint.iterdir()}
    assert modes["model.safetensors"] == modes["meta.json"], modes
