"""Where and in which precision to run: device auto-selection and autocast settings.

`auto` picks CUDA, then Apple MPS, then the CPU. Precision `auto` means bf16 autocast on
GPUs that support it, fp16 (with a gradient scaler in training) on older GPUs, and plain
fp32 on the CPU, where low-precision autocast is slower and less exact.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from sllm.errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str = "auto") -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"device {name} is not available on this machine; use train.device=auto or cpu")
    return torch.device(name)


def select_autocast_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type == "cpu":
        raise UserError("fp16 autocast is not supported on the CPU; use train.dtype=bf16 or fp32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls on Ampere+ GPUs through TF32 tensor cores: ~8x faster, 10-bit mantissa,
    harmless for training, which already runs its matmuls in bf16 under autocast."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
