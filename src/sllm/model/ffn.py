"""MLP-only baseline (`model.arch: ffn`): a Bengio-style neural language model.

Each position sees its last `ffn_window` token embeddings (a learned padding vector before the
start) through one hidden layer, no attention: it shows what attention buys on the same data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sllm.config import ModelConfig


class WindowMLP(nn.Module):
    supports_kv_cache = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.window = cfg.ffn_window
        hidden = cfg.ffn_hidden or 4 * cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pad = nn.Parameter(torch.zeros(cfg.n_embd))
        self.fc = nn.Linear(self.window * cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        for module in (self.wte, self.fc, self.proj):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, cache: None = None) -> torch.Tensor:
        batch, length = idx.shape
        x = self.wte(idx)
        padding = self.pad.expand(batch, self.window - 1, -1)
        x = torch.cat([padding, x], dim=1)
        windows = x.unfold(1, self.window, 1)  # (B, T, n_embd, window)
        windows = windows.transpose(2, 3).reshape(batch, length, -1)
        h = self.proj(self.drop(F.gelu(self.fc(windows), approximate="tanh")))
        return self.norm_f(h)

    def forward(self, idx: torch.Tensor, cache: None = None) -> torch.Tensor:
        return F.linear(self.hidden_states(idx), self.wte.weight)
