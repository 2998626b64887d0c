"""How a global batch splits into micro-batches, and `train.micro_batch: auto`.

micro_batch × grad_accum × world_size = batch_size. `auto` takes the largest power of two
dividing the per-process batch that survives one real training step, trying sizes upward so
at most one try runs out of memory. On the CPU that is the OOM killer, not an exception, so
candidates are first capped by `training_memory`'s estimate against half the available RAM.
Each rank searches alone (no collectives that could hang) and all take the minimum.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import torch

from sllm.config import Config, validate
from sllm.errors import UserError


def find_batch_size(cfg: Config, world_size: int) -> None:
    """`sllm train --find-batch-size`: the configured global batch, with `micro_batch: auto`."""
    t = cfg.train
    if t.micro_batch != "auto":
        t.batch_size = t.batch_size or t.micro_batch * t.grad_accum * world_size
        t.micro_batch, t.grad_accum = "auto", 1
    validate(cfg)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """Sequences each process handles per optimizer step."""
    if batch_size % world_size:
        raise UserError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({world_size})"
        )
    return batch_size // world_size


def accumulation_steps(batch_size: int, micro_batch: int, world_size: int) -> int:
    """grad_accum such that micro_batch × grad_accum × world_size = batch_size."""
    share = per_process_batch(batch_size, world_size)
    if share % micro_batch:
        raise UserError(
            f"train.batch_size ({batch_size}) over {world_size} processes is {share} sequences each, "
            f"not a multiple of the micro-batch {micro_batch}; change train.batch_size or train.micro_batch"
        )
    return share // micro_batch


def power_of_two_sizes(share: int) -> list[int]:
    """1, 2, 4, ... up to the largest power of two dividing `share`."""
    sizes = [1]
    while share % (sizes[-1] * 2) == 0:
        sizes.append(sizes[-1] * 2)
    return sizes


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> int:
    """The largest of the ascending `sizes` before the first that does not fit; 0 if none does."""
    chosen = 0
    for size in sizes:
        if not fits(size):
            break
        chosen = size
    return chosen


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def survives(step: Callable[[int], None]) -> Callable[[int], bool]:
    """`fits(size)`: runs `step(size)`, False if it ran out of memory (the exception is dropped
    before freeing: its traceback holds the step's tensors)."""

    def fits(size: int) -> bool:
        try:
            step(size)
            ran = True
        except torch.OutOfMemoryError:
            ran = False
        free_memory()
        return ran

    return fits


def available_ram_bytes() -> int:
    """Memory the kernel can still hand out: MemAvailable on Linux, free pages elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
