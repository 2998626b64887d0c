"""Where and in which precision to run: device auto-selection and autocast settings.

`auto` picks CUDA, then Apple MPS, then the CPU; precision `auto` is bf16 autocast on GPUs
that support it, fp16 (with a gradient scaler) on older ones, plain fp32 on the CPU.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import AbstractContextManager, nullcontext

import torch

from sllm.errors import UserError

Dtype = torch.dtype | None  # an autocast dtype; None: plain fp32
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
BF16_HINT_MIN_PARAMETERS = 5_000_000


def select_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if (kind == "cuda" and not cuda) or (kind == "mps" and not mps):
        raise UserError(f"device {name} is not available on this machine; use auto or cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPUs")
    return torch.device(name)


def select_autocast_dtype(device: torch.device, name: str = "auto") -> Dtype:
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type == "cpu":
        raise UserError("fp16 autocast is not supported on the CPU; use train.dtype=bf16 or fp32")
    return DTYPES[name]


def cpu_bf16_hint(device: torch.device, dtype: Dtype, parameters: int) -> str | None:
    """A line for an fp32 run on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX), where
    bf16 trained the 10m shape 1.5x as fast, the 1M demo only 1.06x (docs/benchmarks.md)."""
    if device.type != "cpu" or dtype is not None or parameters < BF16_HINT_MIN_PARAMETERS:
        return None
    native = [getattr(torch.cpu, name, lambda: False)() for name in NATIVE_BF16_CHECKS]
    if not any(native):
        return None
    return (
        "this CPU multiplies bf16 natively: train.dtype=bf16 trained a 10M-parameter model"
        " 1.5x as fast as fp32 on such a CPU"
    )


def autocast(device: torch.device, dtype: Dtype, cache: bool = True) -> AbstractContextManager:
    """`cache=False` for CUDA graph capture: cached casts would be freed when the context exits."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls on Ampere+ through TF32 (~8x faster; training runs bf16 under autocast anyway)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of unmapping them: 11 % faster steps at the 10m
    shape on one CPU thread (docs/log.md), at the cost of keeping the peak heap. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc, e.g. musl
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
