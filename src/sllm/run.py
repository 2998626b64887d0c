"""The run directory: the name of every file in it, the checkpoint metadata, and opening a run.

A run directory holds config.yaml (the resolved config), plan.json (what the trainer derived
from it: steps, micro-batch, accumulation), tokenizer.json, `checkpoints/` (periodic
`step-N`/`epoch-N` directories, `LATEST`, `best/`), metrics.jsonl, tb/ and samples/. Each
checkpoint holds model.safetensors, state.pt and meta.json, whose fields are `CheckpointMeta`.
Reading here verifies the sha256 of both files and falls back to the newest older checkpoint
that verifies; writing lives with the trainer (`sllm.train.checkpoint`). This module imports
neither `train` nor `infer`, so generation and evaluation open runs without the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sllm.config import Config, config_from_dict
from sllm.errors import UserError
from sllm.files import FieldError, loads_json, read_text, read_yaml, sha256_file, typed
from sllm.model import build_model
from sllm.tokenizer import TOKENIZER_FILE as TOKENIZER_FILE  # the run keeps a copy under this name
from sllm.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.yaml"
PLAN_FILE = "plan.json"  # `sllm.train.plan.RunPlan`: the values the trainer derived
STS_CONFIG_FILE = "sts.yaml"  # marks an STS run (`sllm.finetune.sts`), which is no language model
SFT_CONFIG_FILE = "sft.yaml"  # the settings and data an SFT run was made with
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
SAMPLES_DIR = "samples"
WANDB_ID_FILE = "wandb_id"
LOCK_FILE = ".lock"  # held (flock) by the process training the run; holds its PID
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"  # in checkpoints/: the name of the newest complete checkpoint
BEST = "best"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKPOINT_META_FILE = "meta.json"  # `CheckpointMeta`; not the prepared data's meta.json
LATEST_NAME = "latest"  # `open_run(checkpoint=...)`: the newest checkpoint that verifies
_PERIODIC_NAME = re.compile(r"(step|epoch)-\d+")
_OTHER_CHECKPOINT = "use another checkpoint of the run (--checkpoint) or restore this one"


@dataclass
class CheckpointMeta:
    """meta.json of a checkpoint. Fields missing from an older checkpoint take these defaults."""

    step: int
    tokens_seen: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_sha256: str | None = None
    objective: str = "lm"  # what the weights were trained for: lm, sft or sts
    val_loss: float | None = None  # of the last evaluation, at val_step
    val_step: int | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)  # every score of that evaluation
    optimizer: str | None = None
    schedule: str | None = None
    max_steps: int | None = None
    tokens_per_step: int | None = None
    micro_batch: int | None = None
    imported_from: str | None = None  # the Hugging Face directory an imported run came from
    files: dict[str, str] = field(default_factory=dict)  # sha256 of model and state, set on write

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)


@dataclass
class Checkpoint:
    path: Path
    meta: CheckpointMeta

    @property
    def step(self) -> int:
        return self.meta.step

    def model_state(self) -> dict[str, torch.Tensor]:
        path = self.path / MODEL_FILE
        try:
            return load_file(path)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{path} is damaged ({str(exc).splitlines()[0]}); {_OTHER_CHECKPOINT}") from None

    def weights_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights, checked tensor by tensor against `model`'s shapes (the sha256 proves only that
        nothing changed); another float dtype is converted with a warning, any other refused."""
        path, weights, expected = self.path / MODEL_FILE, self.model_state(), model.state_dict()
        problem = _shape_problem(weights, expected)
        if problem:
            raise UserError(f"{path} does not fit the run's model: {problem}; {_OTHER_CHECKPOINT}")
        converted = {n: t.dtype for n, t in weights.items() if t.dtype != expected[n].dtype}
        for name, dtype in converted.items():
            if not dtype.is_floating_point:
                raise UserError(f"{path}: tensor {name!r} holds {dtype}, not weights; {_OTHER_CHECKPOINT}")
            weights[name] = weights[name].to(expected[name].dtype)
        if converted:
            kinds = ", ".join(sorted({str(dtype) for dtype in converted.values()}))
            print(
                f"warning: {path} holds {kinds} weights; converted to {expected[name].dtype}", file=sys.stderr
            )
        return weights

    def train_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"{self.path / STATE_FILE} cannot be loaded safely: {exc}".splitlines()[0]
            ) from None


def _shape_problem(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    missing = [name for name in expected if name not in weights]
    if missing:
        return f"tensor {missing[0]!r} is missing"
    extra = [name for name in weights if name not in expected]
    if extra:
        return f"it holds tensor {extra[0]!r}, which the model does not have"
    for name, tensor in weights.items():
        shape, wanted = list(tensor.shape), list(expected[name].shape)
        if shape != wanted:
            return f"tensor {name!r} has shape {shape}, the model expects {wanted}"
    return None


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is a finite number: a diverged run's weights are not."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def read_checkpoint_meta(path: Path) -> CheckpointMeta:
    """A checkpoint's meta.json (unknown old keys dropped); ValueError naming the problem if damaged."""
    try:
        return typed(loads_json((path / CHECKPOINT_META_FILE).read_bytes().decode("utf-8")), CheckpointMeta)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"meta.json unreadable ({getattr(exc, 'msg', None) or type(exc).__name__})"
        ) from None
    except FieldError as exc:
        raise ValueError(f"meta.json is invalid: {exc}") from None


def _recorded_step(path: Path) -> int:
    """The step in meta.json; -1 when unreadable, so a damaged checkpoint counts as the oldest."""
    try:
        return read_checkpoint_meta(path).step
    except ValueError:
        return -1


def periodic_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Periodic checkpoints (`step-*`, `epoch-*`), newest recorded step first (not by name)."""
    dirs = [p for p in checkpoint_dir.glob("*") if p.is_dir() and _PERIODIC_NAME.fullmatch(p.name)]
    return sorted(dirs, key=_recorded_step, reverse=True)


def verify_checkpoint(path: Path) -> Checkpoint:
    """Read meta.json and check both files against their sha256; raise ValueError if damaged."""
    meta = read_checkpoint_meta(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{name} missing")
        if sha256_file(path / name) != meta.files.get(name):
            raise ValueError(f"{name} does not match its sha256")
    return Checkpoint(path, meta)


def _latest_named(latest_file: Path) -> Path:
    """The checkpoint LATEST names, refused unless it is one of this run's (no `..`, absolute or symlink)."""
    fix = "delete it to use the newest checkpoint that verifies"
    name = read_text(latest_file, fix).strip()
    named = latest_file.parent / name
    if not _PERIODIC_NAME.fullmatch(name) or named.resolve().parent != latest_file.parent.resolve():
        raise UserError(f"{latest_file} names {name[:80]!r}, which is not a checkpoint of this run; {fix}")
    return named


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when the run has none yet."""
    checkpoint_dir = Path(run_dir) / CHECKPOINTS
    candidates = periodic_checkpoints(checkpoint_dir)
    latest_file = checkpoint_dir / LATEST
    if latest_file.is_file():
        named = _latest_named(latest_file)
        candidates = [named] + [p for p in candidates if p != named]
    damaged: list[tuple[Path, ValueError]] = []
    for path in candidates:
        try:
            found = verify_checkpoint(path)
        except ValueError as problem:
            damaged.append((path, problem))
            continue
        for path, problem in damaged:
            print(
                f"warning: checkpoint {path} is damaged ({problem}); using {found.path.name}", file=sys.stderr
            )
        return found
    if candidates:
        problems = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
        raise UserError(f"no checkpoint in {checkpoint_dir} verifies ({problems}); restore one or train anew")
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """A specific checkpoint directory (e.g. `best/`), verified."""
    try:
        return verify_checkpoint(Path(path))
    except ValueError as problem:
        raise UserError(f"checkpoint {path} is damaged or incomplete ({problem})") from None


@dataclass
class LoadedRun:
    path: Path
    config: Config
    tokenizer: Tokenizer
    model: nn.Module
    checkpoint: Checkpoint


def refuse_foreign_dir(run_dir: Path) -> None:
    """`--out` may be new, empty or a run of ours: training must not replace a user's files there."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in (LOCK_FILE, PLAN_FILE, CHECKPOINTS)):
        return  # the lock file, made first and never removed, marks a run that stopped early
    names = sorted(p.name for p in run_dir.iterdir())
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"{run_dir} exists and is not an sllm run (it holds {shown}); choose another --out")


def read_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        state = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise UserError(f"run directory {run_dir} {state}; check --run")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); train one with `sllm train`")
    fix = "restore the config the run was trained with"
    raw = read_yaml(path, fix)
    if not isinstance(raw, dict):
        raise UserError(f"{path} is damaged (not a mapping of config sections); {fix}")
    return config_from_dict(raw)


def find_checkpoint(run_dir: Path, checkpoint: str = LATEST_NAME) -> Checkpoint:
    """The checkpoint `checkpoint` names (`latest`, `best`, `step-N`, `epoch-N` or a checkpoint
    directory of the run), else one line listing what the run holds."""
    checkpoints = run_dir / CHECKPOINTS
    if checkpoint == LATEST_NAME:
        found = load_latest(run_dir)
        if found is None:
            raise UserError(f"{run_dir} has no checkpoint yet; train it first")
        return found
    if checkpoint == BEST and not (checkpoints / BEST).is_dir():
        raise UserError(
            f"{run_dir} has no best checkpoint (evaluations against a validation split write it); "
            "use the latest checkpoint instead"
        )
    path = _named_checkpoint(checkpoints, checkpoint)
    if path is None or not path.is_dir():
        held = [p.name for p in reversed(periodic_checkpoints(checkpoints))] if checkpoints.is_dir() else []
        if (checkpoints / BEST).is_dir():
            held.append(BEST)
        raise UserError(
            f"{run_dir} has no checkpoint {checkpoint!r}; it holds: {', '.join(held) or 'none yet'} "
            f"(--checkpoint takes {LATEST_NAME}, {BEST}, step-N, epoch-N or a checkpoint directory)"
        )
    return load_checkpoint(path)


def _named_checkpoint(checkpoints: Path, name: str) -> Path | None:
    """The directory `name` means, or None when it names nothing in this run."""
    number = re.fullmatch(r"(step|epoch)-(\d+)", name)
    if number:
        kind, value = number.group(1), int(number.group(2))
        return checkpoints / (step_name(value) if kind == "step" else epoch_name(value))
    if name == BEST:
        return checkpoints / BEST
    path = Path(name).resolve()
    inside = path.parent == checkpoints.resolve() and (
        path.name == BEST or _PERIODIC_NAME.fullmatch(path.name)
    )
    return path if inside else None


def open_run(run_dir: str | Path, device: torch.device, checkpoint: str = LATEST_NAME) -> LoadedRun:
    """A run's language model in eval mode on `device`, from the checkpoint `checkpoint` names."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if (run_dir / STS_CONFIG_FILE).is_file():
        raise UserError(
            f"{run_dir} is an STS run (a sentence-similarity scorer, not a language model); "
            f"score it with `sllm eval sts --run {run_dir} --data ...`"
        )
    found = find_checkpoint(run_dir, checkpoint)
    tokenizer = load_tokenizer(run_dir)
    model = build_model(config.model)
    model.load_state_dict(found.weights_for(model))
    if not all_finite(model.state_dict().values()):
        raise UserError(
            f"{found.path} holds weights that are not finite numbers (the run diverged before "
            "sllm stopped such runs); retrain from an earlier checkpoint with a lower train.lr"
        )
    return LoadedRun(run_dir, config, tokenizer, model.to(device).eval(), found)
