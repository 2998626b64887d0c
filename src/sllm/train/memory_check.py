"""Refuse a run that cannot fit in memory before any of it is allocated.

The model is built on the `meta` device and the estimate (`sllm.model.stats.training_memory`:
weights, gradients, AdamW state, one micro-batch's activations) is compared with the free GPU
memory or available RAM; without it a huge model fills the RAM until the OOM killer ends it.
The estimate leans low, so a refused run would not have fit; the borderline is left to the real
step and `--find-batch-size`.
"""

from __future__ import annotations

import os

import torch

from sllm.config import TrainConfig
from sllm.errors import UserError
from sllm.train.batch_size import available_ram_bytes
from sllm.train.distributed import Cluster
from sllm.train.objectives import Objective


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def require_memory(
    objective: Objective,
    t: TrainConfig,
    micro_batch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    cluster: Cluster,
) -> None:
    """Raise a `UserError` with the numbers when training clearly cannot fit on `device`."""
    with torch.device("meta"):
        model = objective.build_model()
    memory = objective.memory(model, micro_batch)
    if memory is None:
        return
    # A fine-tuned model is loaded already (not on `meta`): on the CPU its weights are in use.
    loaded = device.type == "cpu" and not all(p.is_meta for p in model.parameters())
    shards = cluster.world_size if t.parallel == "fsdp" else 1
    parts = {
        "weights": 0 if loaded else memory.weights_bytes // shards,
        "gradients": memory.gradients_bytes // shards,
        "optimizer state": memory.optimizer_bytes // shards if t.optimizer == "adamw" else 0,
        "activations": memory.activations_bytes * (2 if amp_dtype is None else 1),
    }
    needed, available = sum(parts.values()), available_bytes(device)
    if needed <= available:
        return
    if needed - parts["activations"] > available:
        fix = "choose a smaller model (model.n_layer, model.n_embd)"
    else:
        fix = (
            "lower train.micro_batch (or let --find-batch-size choose it), shorten train.block_size "
            "or turn on train.activation_checkpointing"
        )
    detail = ", ".join(f"{name} {size / 1e9:,.2f}" for name, size in parts.items())
    raise UserError(
        f"this run does not fit in memory: training needs about {needed / 1e9:,.2f} GB ({detail} GB "
        f"at micro-batch {micro_batch}) but the {device.type} has {available / 1e9:,.2f} GB "
        f"available; {fix}"
    )
