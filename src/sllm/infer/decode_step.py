"""The eager decode step: one token per row through a GPT and its KV cache, without module calls.

A decode step of a small model multiplies a few rows by each weight matrix: microseconds of
arithmetic. Going through `nn.Module` costs about as much again per call (the call machinery,
parameter lookups through `__getattr__`, dropout modules that do nothing at inference), and
a block makes thirteen such calls. On the 2-core CPU this step ran 1.6× as fast as
`GPT.forward` for the demo shape at batch 1 (1.3× at batch 8) and 1.2× for a 10M model,
whose step is mostly matrix products (docs/log.md).

`DecodeStep` binds each layer's weights once, when a stream starts, and calls the model's own
pieces (`split_heads`, `attend`, the norms, the position tables, the activation), so it
computes what `GPT.forward` computes for a one-token step; tests compare the two for every
architecture option. Prefills and refills still go through `GPT.forward`, and so does any
model that is not a plain `GPT` in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sllm.model.gpt import GPT, MLP, Block, KVCache, Rotation, SwiGLU

Step = Callable[[torch.Tensor], torch.Tensor]


def supports_decode_step(model: nn.Module) -> bool:
    """A plain GPT in eval mode (training mode would need dropout; wrappers need their hooks)."""
    return type(model) is GPT and not model.training


def _norm(module: nn.Module) -> Step:
    """The norm as a function: LayerNorm's arguments bound once, RMSNorm's own forward."""
    if isinstance(module, nn.LayerNorm):
        return partial(
            F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
            bias=module.bias, eps=module.eps,
        )  # fmt: skip
    return module.forward


def _linear(module: nn.Linear) -> Step:
    """The layer on (rows, in) inputs: one `addmm` (or `mm`) with the transpose taken once,
    where `F.linear` would also reshape and transpose at every call."""
    weight_t, bias = module.weight.t(), module.bias
    if bias is None:
        return lambda x: torch.mm(x, weight_t)
    return lambda x: torch.addmm(bias, x, weight_t)


def _mlp(module: nn.Module) -> Step:
    """The MLP's matrices and activation, bound once."""
    if isinstance(module, SwiGLU):
        gate, up, proj = _linear(module.gate), _linear(module.up), _linear(module.proj)
        return lambda x: proj(F.silu(gate(x)) * up(x))
    assert isinstance(module, MLP)
    fc, proj, activation = _linear(module.fc), _linear(module.proj), module.activation
    return lambda x: proj(activation(fc(x)))


class _Layer:
    """One block's decode step on (batch, n_embd) rows: x + attention(norm1(x)), then
    x + mlp(norm2(x))."""

    def __init__(self, block: Block) -> None:
        self.attention = block.attn
        self.norm1, self.norm2 = _norm(block.norm1), _norm(block.norm2)
        self.qkv, self.proj = _linear(block.attn.qkv), _linear(block.attn.proj)
        self.q_norm, self.k_norm = block.attn.q_norm.forward, block.attn.k_norm.forward
        self.mlp = _mlp(block.mlp)

    def __call__(
        self, x: torch.Tensor, cache: KVCache, mask: torch.Tensor | None, rotate: Rotation
    ) -> torch.Tensor:
        attention, batch = self.attention, x.size(0)
        q, k, v = attention.split_heads(self.qkv(self.norm1(x)).view(batch, 1, -1))
        q, k = rotate(self.q_norm(q)), rotate(self.k_norm(k))
        k, v = cache.store(attention.layer, k, v)
        x = x + self.proj(attention.attend(q, k, v, mask).view(batch, -1))
        return x + self.mlp(self.norm2(x))


class DecodeStep:
    """Next-token logits (batch, vocab) for one new token per row, through `cache`."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.layers = [_Layer(block) for block in model.blocks]
        self.final_norm = _norm(model.norm_f)
        self.head_t = model.head_weight.t()
        self.vocab_size = model.cfg.vocab_size

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`tokens` (batch,) follow what `cache` holds; it must have room for them."""
        model = self.model
        positions, mask = cache.positions(1), cache.attention_mask(1)
        x = F.embedding(tokens, model.wte.weight) + model.wpe(positions.view(-1))
        rotate = model.wpe.rotation(positions)
        for layer in self.layers:
            x = layer(x, cache, mask, rotate)
        cache.advance(1)
        return torch.mm(self.final_norm(x), self.head_t)[:, : self.vocab_size]
