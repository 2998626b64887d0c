"""Faster fp32 linear layers on AVX-512 CPUs, switched on from outside the model.

On AMD CPUs MKL runs AVX2 kernels even where AVX-512 exists; oneDNN picks by instruction set
(1.2–1.3× faster forward and backward on the 2-core Zen 5 VM, docs/log.md). Inside
`onednn_linears(device)`, a `TorchFunctionMode` chosen by instruction set (never by timing, so
resume stays exact), `F.linear` goes through oneDNN; CUDA, bf16, autocast, compile, DTensor,
column-major weights and activation checkpointing keep `F.linear`. First derivatives only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode


def onednn_linears(
    device: torch.device, activation_checkpointing: bool = False
) -> contextlib.AbstractContextManager:
    """A context in which `F.linear` goes through oneDNN where `device` is a CPU with AVX-512.
    Not with activation checkpointing: its recomputation in backward (no mode active) must save
    what the forward saved."""
    if device.type == "cpu" and onednn_suits_this_cpu() and not activation_checkpointing:
        return _OneDnnLinears()
    return contextlib.nullcontext()


@functools.cache
def onednn_suits_this_cpu() -> bool:
    """This torch has oneDNN's linear and this CPU has AVX-512."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
    )


class _OneDnnLinears(TorchFunctionMode):
    """Sends the `F.linear` calls that `_fits` to `_OneDnnLinear`; every other call runs as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _fits(*args, **kwargs):
            return _linear(*args, **kwargs)
        return func(*args, **kwargs)


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and weight.is_contiguous()
        and (bias is None or bias.is_contiguous())
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` by `_OneDnnLinear` on the rows of `x`, reshaped back outside the Function (so
    the output may be changed in place)."""
    rows = _OneDnnLinear.apply(x.reshape(-1, x.size(-1)), weight, bias)
    return rows.view(*x.shape[:-1], weight.size(0))


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` by oneDNN, for 2-D `x`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """`rows @ weight.T + bias` on 2-D rows, with the gradients `F.linear` has."""

    @staticmethod
    def forward(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn_product(rows, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        rows, weight, bias = inputs
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable  # the oneDNN product has no derivative: refuse double backward loudly
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = _onednn_product(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ rows  # MKL: faster than oneDNN for this shape here
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_rows, grad_weight, grad_bias
