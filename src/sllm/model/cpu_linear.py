"""Linear layers through oneDNN on AVX-512 CPUs, for training and scoring.

torch sends an fp32 matrix product on x86 to MKL, which on AMD processors runs its AVX2
kernels even where the CPU has AVX-512. oneDNN, also inside every x86 build of torch,
picks its kernels by instruction set. On the 2-core AMD EPYC (Zen 4) development machine
its products were 1.1–1.6× MKL's for the forward and input-gradient shapes of a training
step (block 256 × batch 8 rows by 256–1024 wide matrices), while MKL stayed ahead for the
weight gradient (docs/log.md). So on a CPU with AVX-512 a layer computes
`x @ W.T + b` and `grad @ W` with oneDNN and `grad.T @ x` with MKL.

The choice follows the instruction set alone, never a timing, so it is the same every time
a run starts on a machine and resume stays exact. `SLLM_CPU_MATMUL=mkl` (or `onednn`)
overrides it. Everything else — CUDA, bf16, autocast, `torch.compile`, layers whose weights
CPU decoding made column-major (`sllm.infer.cpu_layout`) — keeps `F.linear`. The layer has
first derivatives only (double backward raises) and no `vmap` rule.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from sllm.errors import UserError

CHOICES = ("onednn", "mkl")


def onednn_chosen() -> bool:
    """oneDNN for fp32 products: as `SLLM_CPU_MATMUL` says, else where the CPU has AVX-512.
    Read at every call (a dictionary lookup), so a benchmark can time both in one process."""
    choice = os.environ.get("SLLM_CPU_MATMUL", "").strip().lower()
    if not choice:
        return _onednn_by_instruction_set()
    if choice not in CHOICES:
        raise UserError(
            f"SLLM_CPU_MATMUL={choice!r} is not a choice: use onednn or mkl, or unset it to choose by CPU"
        )
    return choice == "onednn" and _onednn_available()


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _onednn_by_instruction_set() -> bool:
    return _onednn_available() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and (bias is None or bias.is_contiguous())
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not torch.compiler.is_compiling()
        and onednn_chosen()
    )


def matmul_transposed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for a 2-D `x`, through oneDNN where it is the faster kernel.
    No autograd: for use inside `autograd.Function`s."""
    if _onednn_fits(x, weight, bias):
        return _onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` by oneDNN, for callers that have checked `_onednn_fits`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """`rows @ weight.T + bias` on 2-D rows, for inputs `linear` found `_onednn_fits`. Callers
    reshape outside, so the output is no view made inside a Function and may be changed in
    place, as `nn.Linear`'s may."""

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for row-major fp32 weights on a CPU where that is faster."""
    if weight.is_contiguous() and not torch.is_autocast_enabled("cpu") and _onednn_fits(x, weight, bias):
        rows = _OneDnnLinear.apply(x.reshape(-1, x.size(-1)), weight, bias)
        return rows.view(*x.shape[:-1], weight.size(0))
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose product goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
