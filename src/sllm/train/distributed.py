"""One process or many through `torchrun`: the same training code path.

Under a launcher that sets RANK / LOCAL_RANK / WORLD_SIZE we join its process group (NCCL on
GPUs, gloo on the CPU) and wrap the model in DDP or shard it with FSDP2; without them there are
no collectives. Checkpoints hold full, unsharded state, so any process count loads any other's.
Rank 0 alone writes files, so multi-node runs need a shared run directory.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sllm.errors import UserError


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """Processes the launcher (torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_as_main() -> bool:
    """Whether this process is rank 0 of the launcher's (or the only one), before joining."""
    return os.environ.get("RANK", "0") == "0"


def join_cluster(device: torch.device, timeout_s: int) -> tuple[Cluster, torch.device]:
    """Join torchrun's process group if launched by it; returns the cluster and this rank's device."""
    world_size = launched_world_size()
    if world_size == 1:
        return Cluster(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs; lower --nproc-per-node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Cluster(rank, local_rank, world_size), device


def leave_cluster(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, cluster: Cluster, device: torch.device, parallel: str) -> nn.Module:
    """The module training steps call: DDP around the model, or the model sharded in place."""
    if not cluster.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _transformer_blocks(model):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_sync_per_step())


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The GPT's blocks, also inside a model that wraps it (the STS scorer's backbone)."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "blocks":
            return list(module)
    return []


def _no_buffer_sync_per_step() -> dict[str, bool]:
    """Buffers (position tables, masks) are equal on every rank: no forward syncs them."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks only on the last micro-step of an accumulation."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (a collective under FSDP: all ranks call)."""
    return (
        get_model_state_dict(model, options=_FULL),
        get_optimizer_state_dict(model, optimizers, options=_FULL),
    )


def load_full_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], model_state: dict, optimizer_state: dict | None
) -> None:
    """Load full state into a plain, DDP-bound or sharded model (each rank shards its part)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)


def barrier(cluster: Cluster) -> None:
    if cluster.distributed:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    if not cluster.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # AVG is NCCL-only
    return total / cluster.world_size


def min_over_ranks(value: int, cluster: Cluster, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. the micro-batch all of them can hold)."""
    if not cluster.distributed:
        return value
    smallest = torch.tensor([value], device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def any_rank(flag: bool, cluster: Cluster, device: torch.device) -> bool:
    """True on every rank if it is true on one (so all ranks stop at the same step)."""
    if not cluster.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
