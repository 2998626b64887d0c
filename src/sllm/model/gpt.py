"""The GPT decoder: token + position embeddings, pre-norm blocks, tied LM head.

Reads top to bottom: positions, norms, the KV cache, attention, MLPs, block, GPT. Options pick
small named pieces from dicts (`POSITIONS`, `NORMS`, `MLPS`) rather than branching inside
`forward`; the defaults are GPT-2 (learned positions, LayerNorm, GELU, tied head). Every
position piece offers both an added embedding (`forward`) and a q/k `rotation`, so attention
never asks which it has; RoPE uses HF Llama's rotate_half layout, so Llama weights map one to
one. Padded embedding rows (`vocab_pad_multiple`) are sliced off the logits, so a padded id is
never predicted. With `targets`, `forward` returns the chunked loss (no full logits, one module
call for DDP). With a KV cache (`sllm.infer.decoder`) the cache hands out positions and mask;
packed documents (`document_ids`, SFT) attend within themselves with positions restarting at 0.
Sources: RMSNorm (Zhang & Sennrich 2019), qk-norm (Dehghani et al. 2023), squared ReLU (So et
al. 2021, Primer), SwiGLU (Shazeer 2020; hidden width 8/3·n_embd keeps a 4·n_embd GELU MLP's
parameters), grouped-query attention (Ainslie et al. 2023; the cache holds only the KV heads),
GPT-2's init (N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sllm.config import ModelConfig
from sllm.model.loss import linear_cross_entropy

Rotation = Callable[[torch.Tensor], torch.Tensor]


def unchanged(t: torch.Tensor) -> torch.Tensor:
    """The identity, as a plain function: a CPU decode step pays for every module call."""
    return t


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` without the module call, its weights read from `_parameters`: in a one-token CPU
    decode step `Module.__getattr__` (~0.5 µs a read, ~100 reads) would be a third of the cost
    (docs/log.md). Blocks likewise read parts from `_modules` and run their `forward`, so hooks on
    parts do not run; FSDP and activation checkpointing wrap whole blocks."""
    weights = layer._parameters
    return F.linear(x, weights["weight"], weights["bias"])


def dropout(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dropout with probability `p`; with p = 0 (the default), `unchanged`."""
    return nn.Dropout(p) if p > 0 else unchanged


class LearnedPositions(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.table = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)

    def rotation(self, positions: torch.Tensor) -> Rotation:
        return unchanged


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos embeddings (Vaswani et al., 2017); nothing to learn, nothing to save."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        block_size, n_embd = cfg.block_size, cfg.n_embd
        position = torch.arange(block_size, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(1e4) / n_embd))
        table = torch.zeros(block_size, n_embd)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]

    def rotation(self, positions: torch.Tensor) -> Rotation:
        return unchanged


class RotaryPositions(nn.Module):
    """RoPE (Su et al. 2021): rotates q and k by position, pair i of a head being (x[i], x[i + d/2])
    turned by position · base^(-2i/d); adds nothing to the embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        head_dim = cfg.n_embd // cfg.n_head
        inverse_frequency = 1.0 / cfg.rope_base ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        )
        angles = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * inverse_frequency
        angles = torch.cat([angles, angles], dim=1)  # (block_size, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> float:
        return 0.0

    def rotation(self, positions: torch.Tensor) -> Rotation:
        """Rotates (B, H, T, head_dim) tensors; positions are (T,) or (B, T)."""
        cos, sin = self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            first, second = t.chunk(2, dim=-1)
            return t * cos.to(t.dtype) + torch.cat([-second, first], dim=-1) * sin.to(t.dtype)

        return rotate


POSITIONS = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions, "rope": RotaryPositions}


class RMSNorm(nn.Module):
    """x / rms(x) · gain (Zhang & Sennrich 2019), computed in fp32 like HF Llama's."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self._parameters["weight"] * normed.to(x.dtype)  # `linear` says why not self.weight


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (same state dict), its weights read as `linear` reads them (0.5 µs a call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._parameters
        return torch.layer_norm(x, self.normalized_shape, weights["weight"], weights["bias"], self.eps)


NORMS: dict[str, Callable[[int, bool], nn.Module]] = {
    "layernorm": lambda width, bias: LayerNorm(width, bias=bias),
    "rmsnorm": lambda width, bias: RMSNorm(width),
}


class AttentionCache(Protocol):
    """What the model needs from a KV cache (`sllm.infer.decoder.KVCache`)."""

    def prepare(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (batch, length) and mask (batch, 1, length, keys) of the next tokens, or no mask."""
        ...

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the next tokens' keys and values; return the keys and values to attend over."""
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        kv_width = self.n_kv_head * self.head_dim
        self.head_counts = [self.n_head, self.n_kv_head, self.n_kv_head]
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else unchanged
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else unchanged
        self.dropout = cfg.dropout
        self.resid_dropout = dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: AttentionCache | None = None,
        mask: torch.Tensor | None = None,
        rotate: Rotation = unchanged,
    ) -> torch.Tensor:
        """`mask` (from `KVCache.prepare`) replaces plain causal attention when given."""
        layers = self._modules  # `linear` says why not self.qkv
        q, k, v = self.split_heads(linear(layers["qkv"], x))
        q, k = rotate(self.q_norm(q)), rotate(self.k_norm(k))
        if cache is not None:
            k, v = cache.store(self.layer, k, v)
        return self.resid_dropout(linear(layers["proj"], self.attend(q, k, v, mask)))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, qkv width) -> q (B, n_head, T, head_dim), k and v (B, n_kv_head, T, head_dim)."""
        batch, length, _ = qkv.shape
        return (
            qkv.view(batch, length, -1, self.head_dim)
            .transpose(1, 2)
            .split_with_sizes(self.head_counts, dim=1)
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Each query's mix of the values, heads merged back: (B, T, n_embd)."""
        batch, _, length, _ = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and length > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # fmt: skip
        return y.transpose(1, 2).reshape(batch, length, -1)


def document_attention(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at each document, and the causal same-document mask (B, 1, T, T)."""
    length = document_ids.size(1)
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return positions, (same_document & causal).unsqueeze(1)


class MLP(nn.Module):
    """Two matrices around an elementwise activation (GELU as in GPT-2, or squared ReLU)."""

    def __init__(self, cfg: ModelConfig, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        hidden = mlp_hidden_width(cfg)
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.activation = activation
        self.dropout = dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._modules
        return self.dropout(linear(layers["proj"], self.activation(linear(layers["fc"], x))))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) · up(x)) (Shazeer 2020): a gated MLP with three matrices."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_hidden_width(cfg)
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._modules
        gated = F.silu(linear(layers["gate"], x)) * linear(layers["up"], x)
        return self.dropout(linear(layers["proj"], gated))


def mlp_hidden_width(cfg: ModelConfig) -> int:
    """`model.mlp_hidden`, else 4·n_embd, or for SwiGLU 8/3·n_embd rounded up to a multiple of 64."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
    return 4 * cfg.n_embd


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


MLPS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "gelu": lambda cfg: MLP(cfg, lambda x: F.gelu(x, approximate="tanh")),
    "relu2": lambda cfg: MLP(cfg, squared_relu),
    "swiglu": SwiGLU,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = NORMS[cfg.norm](cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = NORMS[cfg.norm](cfg.n_embd, cfg.bias)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(
        self,
        x: torch.Tensor,
        cache: AttentionCache | None = None,
        mask: torch.Tensor | None = None,
        rotate: Rotation = unchanged,
    ) -> torch.Tensor:
        """The parts run through `forward`, not `__call__` (`linear` says why)."""
        parts = self._modules
        x = x + parts["attn"].forward(parts["norm1"].forward(x), cache, mask, rotate)
        return x + parts["mlp"].forward(parts["norm2"].forward(x))


def padded_vocab_size(cfg: ModelConfig) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of `model.vocab_pad_multiple`."""
    return cfg.vocab_pad_multiple * math.ceil(cfg.vocab_size / cfg.vocab_pad_multiple)


class GPT(nn.Module):
    supports_kv_cache = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.checkpoint_blocks = False  # set by training: recompute each block in backward
        self.wte = nn.Embedding(padded_vocab_size(cfg), cfg.n_embd)
        self.wpe = POSITIONS[cfg.pos](cfg)
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm_f = NORMS[cfg.norm](cfg.n_embd, cfg.bias)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, padded_vocab_size(cfg), bias=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head (padded rows included): the token embedding unless untied."""
        return self.wte.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def hidden_states(
        self, idx: torch.Tensor, cache: AttentionCache | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd); with a cache, idx continues the cached text;
        `document_ids` (B, T) keeps packed documents apart."""
        if document_ids is not None:
            positions, mask = document_attention(document_ids)
        elif cache is None:
            positions, mask = torch.arange(idx.size(1), device=idx.device), None
        else:
            positions, mask = cache.prepare(idx.size(1))
        parts = self._modules  # `linear` says why not self.wte
        x = self.drop(parts["wte"].forward(idx) + parts["wpe"].forward(positions))
        rotate = parts["wpe"].rotation(positions)
        for block in parts["blocks"]:
            x = self._run_block(block, x, cache, mask, rotate)
        return parts["norm_f"].forward(x)

    def _run_block(
        self,
        block: Block,
        x: torch.Tensor,
        cache: AttentionCache | None,
        mask: torch.Tensor | None,
        rotate: Rotation,
    ) -> torch.Tensor:
        """One block; under activation checkpointing its activations are recomputed in backward."""
        if self.checkpoint_blocks and self.training:
            return checkpoint(block, x, cache, mask, rotate, use_reentrant=False)
        return block(x, cache, mask, rotate)

    def forward(
        self,
        idx: torch.Tensor,
        cache: AttentionCache | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        last_position_only: bool = False,
    ) -> torch.Tensor:
        """Next-token logits (B, T, vocab); with `targets`, their mean cross-entropy instead. Generation
        asks for the last position only (B, 1, vocab), so a prefill skips the prompt × vocab product;
        it goes through `forward` so that wrappers such as FSDP see the call."""
        hidden = self.hidden_states(idx, cache, document_ids)
        if targets is not None:
            return self.chunked_loss(hidden, targets)
        return self.logits(hidden[:, -1:] if last_position_only else hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over the padded rows (the fast shape), their logits sliced off."""
        return F.linear(hidden, self.head_weight)[..., : self.cfg.vocab_size]

    def chunked_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 without materialising the logits (`linear_cross_entropy`)."""
        weight = self.head_weight[: self.cfg.vocab_size]
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_cross_entropy(hidden.float(), weight.float(), targets)
