"""Checkpoints that survive crashes: atomic writes, verified loads, bounded retention.

A checkpoint is a directory `checkpoints/step-NNNNNN/` (or `epoch-NNNN/` at the end of an
epoch, with `train.checkpoint_every: epoch`) holding `model.safetensors` (weights, safe to
load from anyone), `state.pt` (optimizer and counters, loaded with `weights_only=True` so it
cannot run code) and `meta.json` (step, tokens, val loss, the model config and the sha256 of
both files). It is written under a temp name, fsynced and renamed; only then does `LATEST`
(itself replaced atomically) point at it. Loading checks the hashes and falls back to the
newest older checkpoint that verifies, with a warning. Both kinds of name live side by side (a
run saving by epoch still saves by step when it stops mid-epoch), so "newest" means the
highest step recorded in meta.json, never the number in a name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sllm.atomic import (
    DEFAULT_FILE_MODE,
    fsync_path,
    recover_all,
    recover_dir,
    replace_dir,
    temp_path,
    write_text_atomic,
)
from sllm.config import ModelConfig
from sllm.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
BEST = "best"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_PERIODIC_NAME = re.compile(r"(step|epoch)-\d+")


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / MODEL_FILE)

    def train_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"{self.path / STATE_FILE} cannot be loaded safely: {exc}".splitlines()[0]
            ) from None


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(value: Any) -> int:
    """Bytes of all tensors inside nested dicts/lists (the optimizer state's size)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _check_free_space(directory: Path, needed_bytes: int) -> None:
    free_bytes = shutil.disk_usage(directory).free
    if free_bytes < needed_bytes:
        raise UserError(
            f"not enough disk space to save a checkpoint in {directory}: need {needed_bytes / 1e6:,.1f} MB, "
            f"{free_bytes / 1e6:,.1f} MB free; free some space and run the same command to resume"
        )


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is a finite number: a diverged run's weights are not."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors` writes its files readable by their owner only; ours get the mode every
    other file gets, so a shared run directory or export can be read by the group."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, DEFAULT_FILE_MODE)


def write_checkpoint(
    target: Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint directory at `target`, atomically; never harms older ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    needed = _tensor_bytes(weights) + _tensor_bytes(train_state)
    _check_free_space(target.parent, int(1.05 * needed) + (1 << 20))
    tmp = temp_path(target)
    try:
        tmp.mkdir()
        save_tensors(weights, tmp / MODEL_FILE)
        torch.save(train_state, tmp / STATE_FILE)
        files = {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        meta_text = json.dumps({**meta, "files": files}, indent=2, ensure_ascii=False)
        (tmp / META_FILE).write_text(meta_text, "utf-8")
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            fsync_path(tmp / name)
        replace_dir(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not write checkpoint {target.name} ({exc.strerror or exc}); older checkpoints are "
            "intact: fix the cause and run the same command to resume"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_checkpoint(
    run_dir: Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    name: str | None = None,
) -> Path:
    """Save `checkpoints/<name>` (default `step-N`), point LATEST at it, then prune old periodic
    checkpoints."""
    checkpoint_dir = run_dir / CHECKPOINTS
    target = checkpoint_dir / (name or step_name(meta["step"]))
    write_checkpoint(target, model_state, train_state, meta)
    write_text_atomic(checkpoint_dir / LATEST, target.name + "\n")
    _prune(checkpoint_dir, keep_last, keep=target.name)
    return target


def save_best(run_dir: Path, model_state, train_state, meta) -> Path:
    return write_checkpoint(run_dir / CHECKPOINTS / BEST, model_state, train_state, meta)


def clean_leftovers(run_dir: Path) -> None:
    """Before training resumes: put back a `best/` whose replacement a crash cut short, and
    remove temp files of killed writers. A run directory has one writer at a time."""
    checkpoint_dir = Path(run_dir) / CHECKPOINTS
    if checkpoint_dir.is_dir():
        recover_all(checkpoint_dir)


def _read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json with its step and file hashes; ValueError if unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        meta["step"], meta["files"] = int(meta["step"]), dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"meta.json unreadable ({type(exc).__name__})") from None
    return meta


def _recorded_step(path: Path) -> int:
    """The step in meta.json; -1 when unreadable, so a damaged checkpoint counts as the oldest."""
    try:
        return _read_meta(path)["step"]
    except ValueError:
        return -1


def _periodic_dirs(checkpoint_dir: Path) -> list[Path]:
    """Periodic checkpoints (`step-*` and `epoch-*`, not `best/`), newest step first."""
    dirs = [p for p in checkpoint_dir.glob("*") if p.is_dir() and _PERIODIC_NAME.fullmatch(p.name)]
    return sorted(dirs, key=_recorded_step, reverse=True)


def _prune(checkpoint_dir: Path, keep_last: int, keep: str) -> None:
    for path in _periodic_dirs(checkpoint_dir)[keep_last:]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path) -> Checkpoint:
    """Read meta.json and check both files against their sha256; raise ValueError if damaged."""
    meta = _read_meta(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{name} missing")
        if _sha256(path / name) != meta["files"].get(name):
            raise ValueError(f"{name} does not match its sha256")
    return Checkpoint(path, meta)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when the run has none yet."""
    checkpoint_dir = Path(run_dir) / CHECKPOINTS
    candidates = _periodic_dirs(checkpoint_dir)
    latest_file = checkpoint_dir / LATEST
    if latest_file.is_file():
        named = checkpoint_dir / latest_file.read_text(encoding="utf-8").strip()
        candidates = [named] + [p for p in candidates if p != named]
    for number, path in enumerate(candidates):
        try:
            checkpoint = verify_checkpoint(path)
        except ValueError as problem:
            following = candidates[number + 1].name if number + 1 < len(candidates) else "none left"
            _warn(f"checkpoint {path} is damaged ({problem}); falling back to {following}")
            continue
        return checkpoint
    if candidates:
        raise UserError(f"no checkpoint in {checkpoint_dir} verifies; all are damaged")
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """A specific checkpoint directory (e.g. `best/`), verified."""
    try:
        return verify_checkpoint(Path(path))
    except ValueError as problem:
        raise UserError(f"checkpoint {path} is damaged or incomplete ({problem})") from None


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Model config fields that differ, as `name: saved → wanted`. A field the checkpoint does
    not record is older than the checkpoint, which was therefore made with its default."""
    saved = {**asdict(ModelConfig()), **saved}
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: {saved.get(k)!r} → {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]
