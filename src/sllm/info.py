"""`sllm info`: a model's size and cost before (or after) training it.

The model is built on the `meta` device (no memory, no time) from a run's or a file's config:
parameters by component, training FLOPs per token, memory with and without activation
checkpointing (at the micro-batch plan.json settled), KV-cache bytes per token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sllm.config import Config, load_config
from sllm.data.meta import META_FILE, DataMeta
from sllm.errors import UserError
from sllm.files import read_json
from sllm.model import build_model
from sllm.model.stats import (
    kv_cache_bytes_per_token,
    parameters_by_component,
    training_flops_per_token,
    training_memory,
)
from sllm.run import PLAN_FILE, read_run_config


def resolve_for_info(run: str | None, config: str | None, overrides: list[str]) -> Config:
    cfg = read_run_config(Path(run)) if run else load_config(config, overrides)
    if run and cfg.train.micro_batch == "auto" and (Path(run) / PLAN_FILE).is_file():
        plan = read_json(Path(run) / PLAN_FILE, "restore it or train the run again")
        if not isinstance(plan, dict) or not isinstance(plan.get("micro_batch"), int | None):
            raise UserError(f"{Path(run) / PLAN_FILE} is damaged (no integer micro_batch); restore it")
        cfg.train.micro_batch = plan["micro_batch"]
    if cfg.model.vocab_size == 0:
        if not (Path(cfg.data.dir) / META_FILE).is_file():
            raise UserError(
                "the vocabulary size is unknown: set model.vocab_size=N or point data.dir at prepared data"
            )
        cfg.model.vocab_size = DataMeta.read(cfg.data.dir).vocab_size
    return cfg


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def describe_costs(cfg: Config, micro_batch: int | None = None) -> str:
    with torch.device("meta"):
        model = build_model(cfg.model)
    context = cfg.train.block_size or cfg.model.block_size
    batch = micro_batch or (
        cfg.train.batch_size if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    )
    groups = parameters_by_component(model)
    total = sum(groups.values())
    lines = [f"{cfg.model.arch} model: {total:,} parameters ({total / 1e6:.2f}M)"]
    lines += [f"  {name:<10} {count:>14,}  {100 * count / total:5.1f}%" for name, count in groups.items()]
    lines.append(f"training FLOPs per token: {training_flops_per_token(model, cfg.model, context):,.0f}")
    for checkpointing in (False, True):
        memory = training_memory(model, cfg.model, batch, context, checkpointing)
        label = "with" if checkpointing else "without"
        lines.append(
            f"training memory at micro-batch {batch} × {context}, {label} activation checkpointing: "
            f"{_mb(memory.total_bytes)} (weights {_mb(memory.weights_bytes)}, gradients "
            f"{_mb(memory.gradients_bytes)}, AdamW state {_mb(memory.optimizer_bytes)}, activations "
            f"{_mb(memory.activations_bytes)})"
        )
    lines.append(f"KV cache per token (bf16): {kv_cache_bytes_per_token(cfg.model):,} bytes")
    return "\n".join(lines)
