"""Packing short examples into fixed-length rows without letting them see each other.

Examples are placed greedily, in order, into rows of `length` tokens; the rest of a row is
padding with zero weight. Every token carries the number of its example within the row
(`documents`); the GPT turns that into a causal same-document attention mask and
positions that restart at each example (document masks *and* position resets), so a
packed example computes exactly what it would alone. Targets never cross an example's
end: the last token of each example has no target. Examples longer than a row are cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next token ids
    weights: torch.Tensor  # (N, T) 1.0 where the target is trained on
    documents: torch.Tensor  # (N, T) example number within the row; padding has its own
    truncated: int  # examples cut to fit a row

    def __len__(self) -> int:
        return len(self.inputs)


def pack(examples: list[tuple[list[int], list[float]]], length: int, pad_id: int) -> PackedRows:
    """Rows of `length` input tokens from (ids, weights) examples; weight j marks token j a target."""
    rows: list[list[tuple[list[int], list[int], list[float]]]] = [[]]
    used, truncated = 0, 0
    for ids, weights in examples:
        if len(ids) < 2:
            continue
        pieces = (ids[:-1][:length], ids[1:][:length], weights[1:][:length])
        truncated += len(ids) - 1 > length
        if used + len(pieces[0]) > length:
            rows.append([])
            used = 0
        rows[-1].append(pieces)
        used += len(pieces[0])
    rows = [row for row in rows if row]
    packed = PackedRows(
        torch.full((len(rows), length), pad_id, dtype=torch.long),
        torch.zeros((len(rows), length), dtype=torch.long),
        torch.zeros((len(rows), length)),
        torch.zeros((len(rows), length), dtype=torch.long),
        truncated,
    )
    for number, row in enumerate(rows):
        start = 0
        for document, (inputs, targets, weights) in enumerate(row):
            end = start + len(inputs)
            packed.inputs[number, start:end] = torch.tensor(inputs)
            packed.targets[number, start:end] = torch.tensor(targets)
            packed.weights[number, start:end] = torch.tensor(weights)
            packed.documents[number, start:end] = document
            start = end
        packed.documents[number, start:] = len(row)
    return packed
