"""Opening a run directory for use: its resolved config, tokenizer and newest weights.

Evaluation, generation and (later) export all start from a run directory alone: the
config.yaml and tokenizer.json that training copied there, and the newest checkpoint that
verifies (or one named explicitly, such as `best`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from sllm.config import Config, config_from_dict
from sllm.errors import UserError
from sllm.model import build_model
from sllm.tokenizer import Tokenizer, load_tokenizer
from sllm.train.checkpoint import BEST, CHECKPOINTS, Checkpoint, all_finite, load_checkpoint, load_latest

CONFIG_FILE = "config.yaml"
STS_CONFIG_FILE = "sts.yaml"  # marks an STS run (`sllm.finetune.sts`), which is no language model
LATEST_NAME = "latest"  # the newest checkpoint that verifies


@dataclass
class LoadedRun:
    path: Path
    config: Config
    tokenizer: Tokenizer
    model: nn.Module
    checkpoint: Checkpoint


def read_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        state = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise UserError(f"run directory {run_dir} {state}; check --run")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); train one with `sllm train`")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        problem = None if isinstance(raw, dict) else "not a mapping of config sections"
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        problem = str(error).splitlines()[0]
    if problem:
        raise UserError(f"{path} is damaged ({problem}); restore the config the run was trained with")
    return config_from_dict(raw)


def open_run(run_dir: str | Path, device: torch.device, checkpoint: str = "latest") -> LoadedRun:
    """Load a run's model in eval mode on `device` from its newest (or `best`) checkpoint."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if checkpoint not in (LATEST_NAME, BEST):
        raise UserError(f"checkpoint must be {LATEST_NAME!r} or {BEST!r}, got {checkpoint!r}")
    if (run_dir / STS_CONFIG_FILE).is_file():
        raise UserError(
            f"{run_dir} is an STS run (a sentence-similarity scorer, not a language model); "
            f"score it with `sllm eval sts --run {run_dir} --data ...`"
        )
    tokenizer = load_tokenizer(run_dir)
    if checkpoint == BEST:
        if not (run_dir / CHECKPOINTS / BEST).is_dir():
            raise UserError(
                f"{run_dir} has no best checkpoint (evaluations against a validation split write "
                "it); use the latest checkpoint instead"
            )
        found: Checkpoint | None = load_checkpoint(run_dir / CHECKPOINTS / BEST)
    else:
        found = load_latest(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first")
    model = build_model(config.model)
    model.load_state_dict(found.model_state())
    if not all_finite(model.state_dict().values()):
        raise UserError(
            f"{found.path} holds weights that are not finite numbers (the run diverged before "
            "sllm stopped such runs); retrain from an earlier checkpoint with a lower train.lr"
        )
    return LoadedRun(run_dir, config, tokenizer, model.to(device).eval(), found)
