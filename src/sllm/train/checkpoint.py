"""Writing checkpoints that survive crashes: atomic directories, LATEST, bounded retention.

A checkpoint directory (names and reading: `sllm.run`) is written under a temp name, its files
fsynced, then renamed into place; only then does `LATEST` (itself replaced atomically) point at
it, so a kill at any moment leaves the previous checkpoint intact. `state.pt` holds only
tensors, numbers and strings, so it loads with `weights_only=True`. Retention keeps the
`keep_last` newest periodic checkpoints by recorded step; `best/` is kept apart.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sllm.atomic import (
    DEFAULT_FILE_MODE,
    disk_full_error,
    fsync_path,
    recover_all,
    recover_dir,
    replace_dir,
    temp_path,
    write_text_atomic,
    writing_to,
)
from sllm.errors import UserError
from sllm.run import (
    CHECKPOINT_META_FILE,
    CHECKPOINTS,
    LATEST,
    MODEL_FILE,
    STATE_FILE,
    CheckpointMeta,
    periodic_checkpoints,
    sha256_file,
    step_name,
)


def training_state(
    optimizer_state: dict, scaler: torch.amp.GradScaler, step: int, tokens_seen: int, best_rank: float
) -> dict[str, Any]:
    """state.pt: what resume needs besides the weights (`best_rank`: lowest evaluation rank so far)."""
    return {
        "optimizers": optimizer_state,
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "tokens_seen": tokens_seen,
        "best_rank": best_rank,
    }


def _tensor_bytes(value: Any) -> int:
    """Bytes of all tensors inside nested dicts/lists (the optimizer state's size)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors` writes owner-only files; ours get the usual mode, so groups can read them."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, DEFAULT_FILE_MODE)


def write_checkpoint(
    target: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], meta: CheckpointMeta
) -> Path:
    """Write a complete checkpoint directory at `target`, atomically; never harms older ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    needed_bytes = int(1.05 * (_tensor_bytes(weights) + _tensor_bytes(train_state))) + (1 << 20)
    if shutil.disk_usage(target.parent).free < needed_bytes:
        raise disk_full_error(target.parent, f"checkpoint {target.name}", needed_bytes)
    tmp = temp_path(target)
    try:
        with writing_to(target.parent, f"checkpoint {target.name}", needed_bytes):
            tmp.mkdir()
            save_tensors(weights, tmp / MODEL_FILE)
            with open(tmp / STATE_FILE, "wb") as handle:  # a file object: its OSError reaches us
                torch.save(train_state, handle)
            files = {name: sha256_file(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
            meta_json = dataclasses.replace(meta, files=files).to_json()
            (tmp / CHECKPOINT_META_FILE).write_text(meta_json, "utf-8")
            for name in (MODEL_FILE, STATE_FILE, CHECKPOINT_META_FILE):
                fsync_path(tmp / name)
            replace_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(
                f"could not write checkpoint {target.name} ({exc.strerror or exc}); older checkpoints "
                "are intact: fix the cause and run the same command to resume"
            ) from None
        raise
    return target


def save_checkpoint(
    run_dir: Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: CheckpointMeta,
    keep_last: int,
    name: str | None = None,
) -> Path:
    """Save `checkpoints/<name>` (default `step-N`), point LATEST at it, prune old periodic ones."""
    checkpoint_dir = run_dir / CHECKPOINTS
    target = checkpoint_dir / (name or step_name(meta.step))
    write_checkpoint(target, model_state, train_state, meta)
    write_text_atomic(checkpoint_dir / LATEST, target.name + "\n")
    for path in periodic_checkpoints(checkpoint_dir)[keep_last:]:
        if path.name != target.name:
            shutil.rmtree(path, ignore_errors=True)
    return target


def clean_leftovers(run_dir: Path) -> None:
    """Before resuming: restore a `best/` a crash cut short and remove killed writers' temp files."""
    checkpoint_dir = Path(run_dir) / CHECKPOINTS
    if checkpoint_dir.is_dir():
        recover_all(checkpoint_dir)
