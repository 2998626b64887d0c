"""Model builders: `build_model` picks the architecture named by `model.arch`."""

from __future__ import annotations

from torch import nn

from sllm.config import ModelConfig
from sllm.model.ffn import WindowMLP
from sllm.model.gpt import GPT

ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "ffn": WindowMLP}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg`, on the CPU, with fresh weights."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (from the prepared data) before building")
    return ARCHITECTURES[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module) -> str:
    """One line for logs: architecture and size."""
    total = count_parameters(model)
    embedding = model.wte.weight.numel()
    return (
        f"{type(model).__name__}: {total / 1e6:.2f}M parameters "
        f"({(total - embedding) / 1e6:.2f}M without the token embedding)"
    )
