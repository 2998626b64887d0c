"""The run plan: every value the trainer derives from the config, resolved once.

The config says what the user asked for (`train.epochs: 2`, `train.micro_batch: auto`); the
plan what that means on this cluster: the global batch and its split, tokens per step and
epoch, the step count. It is printed at the start and written to `plan.json`. An `auto`
micro-batch stays None until the search settles it or resume takes the recorded one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sllm.atomic import write_text_atomic
from sllm.config import TrainConfig
from sllm.run import PLAN_FILE
from sllm.train.batch_size import accumulation_steps
from sllm.train.objectives import Objective


@dataclass(frozen=True)
class RunPlan:
    objective: str  # lm, sft or sts
    world_size: int  # processes
    batch_size: int  # samples (windows, rows, pairs) per optimizer step, all processes together
    micro_batch: int | None  # samples per forward/backward pass; None until `auto` is settled
    grad_accum: int | None  # micro-batches per process and step
    tokens_per_sample: int
    tokens_per_step: int
    tokens_per_epoch: int
    max_steps: int

    def with_micro_batch(self, micro_batch: int) -> RunPlan:
        grad_accum = accumulation_steps(self.batch_size, micro_batch, self.world_size)
        return dataclasses.replace(self, micro_batch=micro_batch, grad_accum=grad_accum)

    def describe(self) -> str:
        split = f"{self.micro_batch} × {self.grad_accum} accumulation × {self.world_size} processes"
        return (
            f"plan: {self.max_steps:,} steps of {self.batch_size} samples ({split}), "
            f"{self.tokens_per_step:,} tokens per step, {self.tokens_per_epoch:,} per epoch"
        )

    def write(self, run_dir: Path) -> None:
        write_text_atomic(run_dir / PLAN_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def resolve_plan(t: TrainConfig, objective: Objective, world_size: int) -> RunPlan:
    """The plan of `t` for `objective` on `world_size` processes; budgets become steps."""
    batch_size = t.batch_size or (t.micro_batch * t.grad_accum * world_size)  # auto needs batch_size
    tokens_per_sample = objective.tokens_per_sample
    tokens_per_step = batch_size * tokens_per_sample
    tokens_per_epoch = t.tokens_per_epoch or objective.tokens_per_epoch(batch_size)
    budget = t.max_tokens or round(t.epochs * tokens_per_epoch)
    max_steps = max(1, math.ceil(budget / tokens_per_step)) if budget else t.max_steps
    plan = RunPlan(
        objective.name, world_size, batch_size, None, None, tokens_per_sample, tokens_per_step,
        tokens_per_epoch, max_steps,
    )  # fmt: skip
    return plan if t.micro_batch == "auto" else plan.with_micro_batch(t.micro_batch)
