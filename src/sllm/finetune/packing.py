"""Packing short examples into fixed-length rows without letting them see each other.

Examples go greedily, in order, into rows of `length` tokens, padded with zero weight. Each
token carries its example's number within the row (`documents`), which the GPT turns into a
same-document causal mask and restarting positions, so a packed example computes what it would
alone. An example longer than a row loses its oldest tokens first, never its last answer's
targets unless that answer alone is longer than the row. Examples without a target are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Piece = tuple[list[int], list[int], list[float]]  # one example's inputs, targets, weights


@dataclass
class PackedRows:
    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next token ids
    weights: torch.Tensor  # (N, T) 1.0 where the target is trained on
    documents: torch.Tensor  # (N, T) example number within the row; padding has its own
    examples: int  # examples packed
    cut_prompt: int  # examples that lost prompt tokens (only) to fit a row
    cut_answer: int  # examples whose last answer alone is longer than a row: its end is lost
    skipped: int  # examples with no target, left out

    def __len__(self) -> int:
        return len(self.inputs)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.inputs, self.targets, self.weights, self.documents


def _kept_span(weights: list[float], length: int) -> tuple[int, int] | None:
    """The [start, end) tokens of an example that fit a row of `length` inputs; None without a
    target. One too long drops what follows its last target, then its oldest tokens, never the
    token that predicts its last answer's first target, and only then the answer's end."""
    targets = [j for j in range(1, len(weights)) if weights[j] > 0]
    if not targets:
        return None
    if len(weights) <= length + 1:
        return 0, len(weights)
    answer = targets[-1]  # walks back to the first target of the last answer
    while answer > 1 and weights[answer - 1] > 0:
        answer -= 1
    end = max(targets[-1] + 1, length + 1)
    start = min(end - (length + 1), answer - 1)
    return start, start + length + 1


def pack(examples: list[tuple[list[int], list[float]]], length: int, pad_id: int) -> PackedRows:
    """Rows of `length` input tokens from (ids, weights) examples; weight j marks token j a target."""
    pieces: list[Piece] = []
    cut_prompt, cut_answer, skipped = 0, 0, 0
    for ids, weights in examples:
        span = _kept_span(weights, length)
        if span is None:
            skipped += 1
            continue
        start, end = span
        lost_targets = any(w > 0 for w in weights[end:])
        cut_answer += lost_targets
        cut_prompt += not lost_targets and (start > 0 or end < len(ids))
        pieces.append((ids[start : end - 1], ids[start + 1 : end], weights[start + 1 : end]))
    return PackedRows(
        *_fill(_rows(pieces, length), length, pad_id), len(pieces), cut_prompt, cut_answer, skipped
    )


def _rows(pieces: list[Piece], length: int) -> list[list[Piece]]:
    """Greedy, in order: an example that does not fit the current row opens the next."""
    rows: list[list[Piece]] = [[]]
    used = 0
    for piece in pieces:
        if used + len(piece[0]) > length:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    return [row for row in rows if row]


def _fill(rows: list[list[Piece]], length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Inputs, targets, weights and document numbers of the rows, padded to `length`."""
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.zeros((len(rows), length), dtype=torch.long)
    weights = torch.zeros((len(rows), length))
    documents = torch.zeros((len(rows), length), dtype=torch.long)
    for number, row in enumerate(rows):
        start = 0
        for document, (piece_inputs, piece_targets, piece_weights) in enumerate(row):
            end = start + len(piece_inputs)
            inputs[number, start:end] = torch.tensor(piece_inputs)
            targets[number, start:end] = torch.tensor(piece_targets)
            weights[number, start:end] = torch.tensor(piece_weights)
            documents[number, start:end] = document
            start = end
        documents[number, start:] = len(row)
    return inputs, targets, weights, documents
