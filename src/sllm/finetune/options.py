"""Settings every fine-tuning shares, and the trainer config they become.

`sts.*` and `sft.*` keep their own short vocabulary (epochs, batch size, one peak rate).
`trainer_config` turns them into the `Config` the one trainer runs: linear warmup then linear
decay to zero (WSD whose decay spans every step after warmup), an evaluation and a checkpoint
at the end of each epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

from sllm.atomic import write_text_atomic
from sllm.config import Config, ModelConfig, TrainConfig, validate
from sllm.errors import UserError
from sllm.files import read_yaml
from sllm.options import FRACTION, NON_NEGATIVE, POSITIVE, check_range, option
from sllm.run import BEST, CHECKPOINTS, periodic_checkpoints
from sllm.train.batch_size import per_process_batch
from sllm.train.distributed import launched_as_main, launched_world_size

# How a run is executed rather than what it trains: a resume may change them (the trainer says
# when the global batch changes), as `sllm train` allows.
EXECUTION_KEYS = ("device", "dtype", "parallel", "micro_batch", "checkpoint_interval", "keep_last")


@dataclass
class FinetuneOptions:
    epochs: int = option(2, "passes over the training examples", POSITIVE)
    batch_size: int = option(8, "examples per optimizer step, all processes together", POSITIVE)
    lr: float = option(3e-4, "peak learning rate", POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", NON_NEGATIVE)
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up", FRACTION)
    seed: int = option(1234, "seed of the split, the shuffling and dropout")
    checkpoint: str = option("latest", "checkpoint of the base run: latest, best, step-N or epoch-N")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to train")
    micro_batch: int | Literal["auto"] = option(
        0,
        "examples per forward/backward pass; 0: the process's whole share; auto: the largest that fits",
        NON_NEGATIVE,
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto is bf16 or fp16 on GPU, fp32 on CPU"
    )
    parallel: Literal["ddp", "fsdp"] = option("ddp", "with several processes (torchrun): DDP or FSDP2")
    checkpoint_interval: int = option(
        0, "steps between checkpoints; 0: at the end of each epoch", NON_NEGATIVE
    )
    keep_last: int = option(2, "periodic checkpoints kept on disk (best/ is kept apart)", POSITIVE)


def check_options(cfg: FinetuneOptions, section: str) -> None:
    """The declared ranges, also for settings built in code rather than parsed from overrides."""
    for spec in dataclasses.fields(cfg):
        check_range(f"config key {section}.{spec.name}", getattr(cfg, spec.name), spec)


def trainer_config(
    base: Config, model: ModelConfig, out_dir: Path, cfg: FinetuneOptions, rows: int, samples: bool
) -> Config:
    """The trainer's config for fine-tuning `rows` training examples into `out_dir`."""
    steps_per_epoch = math.ceil(rows / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(total * cfg.warmup_ratio))
    micro_batch = cfg.micro_batch or per_process_batch(cfg.batch_size, launched_world_size())
    train = TrainConfig(
        out_dir=str(out_dir), max_steps=total, micro_batch=micro_batch, batch_size=cfg.batch_size,
        lr=cfg.lr, min_lr=0.0, warmup_steps=warmup, weight_decay=cfg.weight_decay, schedule="wsd",
        decay_fraction=max(total - warmup, 1) / total, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
        eval_interval=steps_per_epoch, checkpoint_interval=cfg.checkpoint_interval or steps_per_epoch,
        keep_last=cfg.keep_last, log_interval=min(10, steps_per_epoch), parallel=cfg.parallel,
        dist_timeout_s=base.train.dist_timeout_s,
    )  # fmt: skip
    config = replace(
        base,
        model=model,
        train=train,
        eval=replace(base.eval, batch_size=cfg.batch_size),
        log=replace(
            base.log, samples_at_eval=samples, progress=True
        ),  # the bar: as a terminal and --quiet say
    )
    validate(config)
    return config


def _what_is_trained(settings: dict, section: str) -> dict:
    return {
        **settings,
        section: {k: v for k, v in settings.get(section, {}).items() if k not in EXECUTION_KEYS},
    }


def keep_settings(out_dir: Path, name: str, settings: dict, section: str) -> None:
    """A fine-tuning resumes only with its settings and data (in `name`; `EXECUTION_KEYS` may change)."""
    checkpoints = out_dir / CHECKPOINTS
    if not (periodic_checkpoints(checkpoints) or (checkpoints / BEST).is_dir()):
        return
    path = out_dir / name
    recorded = read_yaml(path, "restore it, or choose a new --out") if path.is_file() else None
    wanted = _what_is_trained(settings, section)
    if not isinstance(recorded, dict) or _what_is_trained(recorded, section) != wanted:
        raise UserError(
            f"{out_dir} already holds checkpoints of a fine-tuning with other settings or data; "
            "run the same command to resume it, or choose a new --out"
        )


def main_process_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on rank 0 (or alone), silence on the other ranks of a torchrun job."""
    return log if launched_as_main() else lambda _: None


def write_settings(out_dir: Path, name: str, settings: dict) -> None:
    write_text_atomic(out_dir / name, yaml.safe_dump(settings, allow_unicode=True, sort_keys=False))
