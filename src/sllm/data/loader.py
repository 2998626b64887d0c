"""Windows over memory-mapped token files: random ones for training, strided ones for eval.

A training micro-batch's windows are a pure function of (seed, step, index), index =
micro_step * world_size + rank: resume needs no loader state, and N processes read what one
accumulating N micro-batches reads. Evaluation slides windows by `stride` and counts only the
targets the previous window did not score, so every token after the first is scored once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sllm.data.mixture import TrainMixture
from sllm.data.shards import TokenShards
from sllm.errors import UserError


@dataclass(eq=False)
class TrainWindows:
    """Random windows of `block_size + 1` tokens by (step, micro-batch index); sources drawn by weight."""

    tokens: np.ndarray | TokenShards
    block_size: int
    micro_batch: int
    seed: int
    mixture: TrainMixture | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) < self.block_size + 1:
            raise UserError(
                f"the train split has {len(self.tokens)} tokens, fewer than block_size + 1 "
                f"({self.block_size + 1}); lower train.block_size or add data"
            )
        if self.mixture is not None and (self.mixture.ends - self.mixture.begins <= self.block_size).any():
            raise UserError(
                f"a weighted source has fewer than {self.block_size + 1} training tokens; lower "
                "train.block_size or give that source more text"
            )

    def starts(self, step: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, index])
        if self.mixture is not None:
            return self.mixture.window_starts(rng, self.micro_batch, self.block_size + 1)
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.micro_batch)

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, int64 tensors of shape (micro_batch, block_size)."""
        starts = self.starts(step, index)
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def fixed_windows(tokens: np.ndarray, block_size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` evenly spaced windows: the same set at every periodic evaluation."""
    block_size = min(block_size, len(tokens) - 1)
    if block_size < 1:
        raise UserError("the validation split has fewer than 2 tokens; raise data.val_ratio")
    starts = np.unique(np.linspace(0, len(tokens) - block_size - 1, count).astype(np.int64))
    windows = torch.from_numpy(np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class Span:
    """Window `tokens[begin:end]` predicting `tokens[begin+1:end+1]`; its last `scored` count."""

    begin: int
    end: int
    scored: int


def strided_spans(n_tokens: int, block_size: int, stride: int) -> Iterator[Span]:
    """Windows covering every target position 1..n_tokens-1 exactly once."""
    if not 1 <= stride <= block_size:
        raise ValueError("stride must be in [1, block_size]")
    begin, scored_until = 0, 0
    while scored_until < n_tokens - 1:
        end = min(begin + block_size, n_tokens - 1)
        yield Span(begin, end, end - scored_until)
        scored_until = end
        begin += stride


class EvalBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T) padded with 0
    targets: torch.Tensor  # (B, T)
    scored: torch.Tensor  # (B, T) bool: which targets count


def eval_batches(tokens: np.ndarray, block_size: int, stride: int, batch_size: int) -> Iterator[EvalBatch]:
    """Strided windows grouped into padded batches with a mask of the targets that count."""
    spans = list(strided_spans(len(tokens), block_size, stride))
    for first in range(0, len(spans), batch_size):
        group = spans[first : first + batch_size]
        width = max(s.end - s.begin for s in group)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.zeros(len(group), width, dtype=torch.long)
        scored = torch.zeros(len(group), width, dtype=torch.bool)
        for row, span in enumerate(group):
            length = span.end - span.begin
            window = torch.from_numpy(tokens[span.begin : span.end + 1].astype(np.int64))
            inputs[row, :length] = window[:-1]
            targets[row, :length] = window[1:]
            scored[row, length - span.scored : length] = True
        yield EvalBatch(inputs, targets, scored)
