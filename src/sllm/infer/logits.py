"""Turning next-token logits into tokens: banned tokens, penalties, temperature, top-k, top-p, min-p.

Each rule is a small function on a (batch, vocab) tensor, tested on hand-made distributions.
Temperature 0 (below `GREEDY_BELOW`) is greedy, and top-p always keeps the likeliest token, so
no setting leaves a row without a token. Order as in vLLM and HF: penalties on the raw logits,
then temperature, then the filters. The repetition penalty (CTRL) covers prompt and generated
tokens, presence and frequency penalties (OpenAI) the generated ones; see `SamplingParams`.
"""

from __future__ import annotations

import torch

from sllm.sampling import GREEDY_BELOW, SamplingParams


class TokenHistory:
    """Per row: which tokens the prompt holds and how often each token was generated."""

    def __init__(self, prompts: list[list[int]], vocab_size: int, device: torch.device) -> None:
        self.in_prompt = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            self.in_prompt[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.generated = torch.zeros(len(prompts), vocab_size, device=device)

    def add(self, tokens: torch.Tensor) -> None:
        """Count one new token per row."""
        self.generated.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float))


class BannedTokens:
    """What a step may not draw: `never` always and, before `min_new_tokens` new tokens, `ending`
    (EOS, one-token stop strings), as HF's `min_new_tokens`."""

    def __init__(
        self, never: tuple[int, ...], ending: tuple[int, ...], min_new_tokens: int, device: torch.device
    ) -> None:
        self.always = torch.tensor(never, dtype=torch.long, device=device)
        self.early = torch.tensor(sorted({*never, *ending}), dtype=torch.long, device=device)
        self.min_new_tokens = min_new_tokens

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """`logits` of new token number `step` (from 0), banned ones at -inf."""
        banned = self.early if step < self.min_new_tokens else self.always
        return logits.index_fill(1, banned, float("-inf")) if len(banned) else logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): logits of `seen` tokens are divided by `penalty` if
    positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: subtract `presence` once per generated token and `frequency` per use."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0) - frequency * counts


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
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p  # mass before this token
    drop_sorted[:, 0] = False  # a `p` that rounds to 0 in float32 would drop every token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least `min_p` times as likely as the most likely one (Nguyen et al., 2024)."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    history: TokenHistory | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab); `history` feeds the penalties."""
    logits = logits.float()
    if history is not None:
        seen = history.in_prompt | (history.generated > 0)
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = apply_presence_frequency(
            logits, history.generated, params.presence_penalty, params.frequency_penalty
        )
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits / params.temperature, params.top_k)
    logits = min_p_filter(top_p_filter(logits, params.top_p), params.min_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
