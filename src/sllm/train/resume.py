"""Which checkpoint a run may continue from, and what it must refuse or point out.

Resume continues the run's newest verified checkpoint, refused for another model shape or
optimizer, and says so when the global batch or schedule changed (allowed, but no longer a
replay). `init_from` takes only another run's weights, refused when shapes or tokenizer differ.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sllm.config import ModelConfig, TrainConfig
from sllm.errors import UserError
from sllm.run import Checkpoint, CheckpointMeta, load_latest
from sllm.train.plan import RunPlan


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Model fields that differ as `name: saved → wanted` (a field the checkpoint lacks: default)."""
    saved = {**asdict(ModelConfig()), **saved}
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: {saved.get(k)!r} → {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def compatible_checkpoint(run_dir: Path, model_config: ModelConfig, purpose: str) -> Checkpoint | None:
    """The newest verified checkpoint of `run_dir`, refused if made for another model."""
    checkpoint = load_latest(run_dir)
    if checkpoint is None:
        return None
    differences = config_differences(checkpoint.meta.model_config, asdict(model_config))
    if differences:
        if purpose == "resume":
            fix = "use the same model settings or a new --out"
        elif any(difference.startswith("vocab_size") for difference in differences):
            fix = f"prepare the data with `--tokenizer {run_dir}` and leave model.vocab_size at 0"
        else:
            fix = "set those model keys to that run's values"
        raise UserError(
            f"{purpose}: checkpoint {checkpoint.path} was made for another model "
            f"({'; '.join(differences)}); {fix}"
        )
    return checkpoint


def resume_checkpoint(run_dir: Path, model_config: ModelConfig, optimizer: str) -> Checkpoint | None:
    """The checkpoint to resume, refused if made for another model or optimizer."""
    checkpoint = compatible_checkpoint(run_dir, model_config, "resume")
    saved = checkpoint.meta.optimizer if checkpoint else None
    if saved is not None and saved != optimizer:
        raise UserError(
            f"resume: {checkpoint.path} was trained with train.optimizer={saved}, not {optimizer}; "
            f"resume with train.optimizer={saved}, or start a new --out with "
            f"train.init_from={run_dir} to continue its weights with {optimizer}"
        )
    return checkpoint


def changed_settings(meta: CheckpointMeta, plan: RunPlan, t: TrainConfig, step: int) -> list[str]:
    """Notes for a resume with another global batch or schedule: allowed, but said."""
    notes = []
    if meta.tokens_per_step is not None and meta.tokens_per_step != plan.tokens_per_step:
        notes.append(
            f"note: {plan.tokens_per_step:,} tokens per step where the run had {meta.tokens_per_step:,} "
            "(without train.batch_size the global batch follows micro_batch × grad_accum × "
            "processes); set train.batch_size to keep the run's batch"
        )
    for key, now, saved in (
        ("max_steps", plan.max_steps, meta.max_steps),
        ("schedule", t.schedule, meta.schedule),
    ):
        if saved is not None and saved != now:
            notes.append(
                f"note: train.{key} is {now} where the run had {saved}: the "
                f"learning-rate schedule follows the new setting from step {step}"
            )
    return notes


def init_from_checkpoint(
    source_run: Path, model_config: ModelConfig, tokenizer_sha256: str, data: str
) -> Checkpoint:
    """The checkpoint whose weights start a run with `train.init_from`."""
    checkpoint = compatible_checkpoint(source_run, model_config, "train.init_from")
    if checkpoint is None:
        raise UserError(f"train.init_from: {source_run} has no checkpoint to start from")
    if checkpoint.meta.tokenizer_sha256 != tokenizer_sha256:
        raise UserError(f"train.init_from: {source_run} used another tokenizer than {data}")
    return checkpoint
