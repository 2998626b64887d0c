"""The GPT decoder: token + position embeddings, pre-norm blocks, tied LM head.

Reads top to bottom: positions, the KV cache, attention, MLP, block, GPT. Options pick small
named pieces (`POSITIONS`) rather than branching inside `forward`.

- Attention goes through `F.scaled_dot_product_attention`, which picks flash / memory-
  efficient kernels where the hardware has them.
- The LM head reuses the token embedding matrix (weight tying, as in GPT-2), so the
  checkpoint holds one copy and `safetensors` sees no shared tensors.
- Init follows GPT-2: N(0, 0.02), with the residual projections scaled by 1/sqrt(2·n_layer)
  so the residual stream's variance does not grow with depth.
- The KV cache is preallocated for the whole context; decoding writes one slot per step.
  Batches of unequal prompts are left-padded; the cache holds the padding, so it hands out
  the positions and the attention mask (`KVCache.positions`, `KVCache.attention_mask`).
- Packed sequences (several documents in one row, as in SFT) pass `document_ids`: each
  token attends only to earlier tokens of its own document, and positions restart at 0 at
  each document start, so a packed document computes exactly what it would alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sllm.config import ModelConfig


class LearnedPositions(nn.Module):
    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.table = nn.Embedding(block_size, n_embd)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos embeddings (Vaswani et al., 2017); nothing to learn, nothing to save."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        position = torch.arange(block_size, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(1e4) / n_embd))
        table = torch.zeros(block_size, n_embd)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


POSITIONS = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}


class KVCache:
    """Keys and values of every layer, preallocated as (layer, batch, head, max_len, head_dim).

    A batch of prompts with different lengths is left-padded: row b's first `pad[b]` slots
    hold padding that no query attends to, and its positions count from its first real token.
    A padding query attends only to itself, so no softmax row is empty (which would give NaN).
    """

    def __init__(
        self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.pad: torch.Tensor | None = None
        self.real_slots: torch.Tensor | None = None

    def reset(self, pad: list[int] | None = None) -> None:
        """Start over (no reallocation), with `pad[b]` padding slots in front of row b."""
        self.length = 0
        self.pad = self.real_slots = None
        if pad and any(pad):
            self.pad = torch.tensor(pad, device=self.keys.device)[:, None]
            self.real_slots = torch.arange(self.max_len, device=self.keys.device)[None, :] >= self.pad

    def positions(self, length: int) -> torch.Tensor:
        """Positions of the next `length` tokens: (length,), or (batch, length) when padded."""
        slots = torch.arange(self.length, self.length + length, device=self.keys.device)
        if self.pad is None:
            return slots
        return (slots[None, :] - self.pad).clamp(min=0)

    def attention_mask(self, length: int) -> torch.Tensor | None:
        """Boolean mask for the next `length` queries, or None when plain causal attention does."""
        end = self.length + length
        if self.real_slots is None:
            if length == 1 or self.length == 0:
                return None
            return _prefix_causal_mask(length, self.length, self.keys.device)
        real = self.real_slots[:, None, None, :end]  # (batch, 1, 1, end)
        if length == 1:
            return real
        causal = _prefix_causal_mask(length, self.length, self.keys.device)
        itself = torch.ones_like(causal).tril(diagonal=self.length).triu(diagonal=self.length)
        return causal & (real | itself)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the cached ones; return all of them so far."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` (from `KVCache.attention_mask`) replaces plain causal attention when given."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.store(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and length > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.proj(y))


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


def _prefix_causal_mask(length: int, past: int, device: torch.device) -> torch.Tensor:
    """Queries at positions past..past+length-1 see every cached key and the causal new ones."""
    return torch.ones(length, past + length, dtype=torch.bool, device=device).tril(diagonal=past)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, mask)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    supports_kv_cache = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = POSITIONS[cfg.pos](cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        head_dim = self.cfg.n_embd // self.cfg.n_head
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, self.block_size, head_dim, device, dtype)

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd); with a cache, idx continues the cached text.

        `document_ids` (B, T) marks packed documents, which then cannot see each other.
        """
        past = cache.length if cache is not None else 0
        if past + idx.size(1) > self.block_size:
            raise ValueError(f"sequence of {past + idx.size(1)} tokens exceeds the context {self.block_size}")
        if document_ids is not None:
            positions, mask = document_attention(document_ids)
        elif cache is None:
            positions, mask = torch.arange(idx.size(1), device=idx.device), None
        else:
            positions, mask = cache.positions(idx.size(1)), cache.attention_mask(idx.size(1))
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x, cache, mask)
        if cache is not None:
            cache.length += idx.size(1)
        return self.norm_f(x)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, T, vocab)."""
        return F.linear(self.hidden_states(idx, cache, document_ids), self.wte.weight)
