"""Turning next-token logits into a token: temperature, top-k, top-p, repetition penalty.

Each rule is a small function on a (batch, vocab) logits tensor so tests can check the kept
token sets on hand-made distributions. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sllm.config import SampleConfig, check_sampling


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.max_new_tokens)

    @classmethod
    def from_config(cls, cfg: SampleConfig) -> SamplingParams:
        return cls(
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            cfg.repetition_penalty,
            cfg.seed,
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): seen tokens' logits are divided by `penalty` if
    positive and multiplied if negative, so they always become less likely for penalty > 1."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # mass before this token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab); `seen` holds ids for the penalty."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
