"""Named sources and their mixture: which documents go where, and how often training sees each.

Sources: `data.inputs`, held-out `data.val_inputs` / `test_inputs`, and `data.sources` entries.
Weights are applied by the training sampler: each source's train tokens are one contiguous
range of the split (in meta.json), and a window draws its source by weight, then a start inside
that range, so nothing is dropped or stored twice and no window spans two sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sllm.config import DataConfig
from sllm.data.meta import DataMeta
from sllm.data.sources import Input, ReadOptions, expand_inputs
from sllm.errors import UserError


@dataclass(frozen=True)
class Source:
    """One source of a prepare: its files, how to read them, its weight and its split."""

    name: str
    files: list[Input]
    options: ReadOptions
    weight: float = 0.0
    split: str = "auto"


def _source(
    data: DataConfig,
    name: str,
    inputs: list[str],
    text_field: str = "",
    weight: float = 0.0,
    split: str = "auto",
) -> Source:
    options = dataclasses.replace(ReadOptions.from_config(data), text_field=text_field or data.text_field)
    return Source(name, expand_inputs(inputs), options, weight, split)


def resolve_sources(data: DataConfig) -> list[Source]:
    """The sources of `data`, their files expanded, names unique and weights consistent."""
    sources: list[Source] = []
    if data.input_weights:
        if len(data.input_weights) != len(data.inputs):
            raise UserError(
                f"{len(data.input_weights)} source weights for {len(data.inputs)} inputs; "
                "give one --source-weight per --input"
            )
        for item, weight in zip(data.inputs, data.input_weights, strict=True):
            sources.append(_source(data, item, [item], weight=weight))
    elif data.inputs:
        sources.append(_source(data, "inputs", data.inputs))
    if data.val_inputs:
        sources.append(_source(data, "val_inputs", data.val_inputs, split="val"))
    if data.test_inputs:
        sources.append(_source(data, "test_inputs", data.test_inputs, split="test"))
    for number, entry in enumerate(data.sources):
        if not entry.inputs:
            raise UserError(f"data.sources[{number}] has no inputs; give it a list of files")
        name = entry.name or f"source{number}"
        sources.append(_source(data, name, entry.inputs, entry.text_field, entry.weight, entry.split))
    _check(sources)
    return sources


def _check(sources: list[Source]) -> None:
    if not sources:
        raise UserError("no input files given; pass --input FILE (or set data.inputs or data.sources)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"source names must be unique, got {', '.join(names)}; name each data.sources entry")
    training = [s for s in sources if s.split in ("auto", "train")]
    if not training:
        raise UserError("every source is held out; give at least one source for the train split")
    weights = [s.weight for s in training]
    if any(w < 0 for w in weights):
        raise UserError(f"source weights must not be negative, got {weights}")
    if any(weights) and not all(weights):
        unweighted = ", ".join(s.name for s in training if not s.weight)
        raise UserError(f"some training sources have no weight ({unweighted}); weight all of them or none")


def held_out_splits(sources: list[Source]) -> set[str]:
    """Splits filled from named files; those are not drawn from the other sources."""
    return {s.split for s in sources if s.split in ("val", "test")}


@dataclass(frozen=True)
class TrainMixture:
    """Token ranges of the weighted training sources within the train split, and their weights."""

    begins: np.ndarray
    ends: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def from_meta(cls, meta: DataMeta) -> TrainMixture | None:
        """The mixture recorded by prepare, or None for the natural mix."""
        weighted = [s for s in meta.sources if s.weight > 0]
        if not weighted:
            return None
        weights = np.array([s.weight for s in weighted], dtype=np.float64)
        return cls(
            begins=np.array([s.train_range[0] for s in weighted], dtype=np.int64),
            ends=np.array([s.train_range[1] for s in weighted], dtype=np.int64),
            probabilities=weights / weights.sum(),
        )

    def window_starts(self, rng: np.random.Generator, count: int, window: int) -> np.ndarray:
        """`count` window starts: a source by weight, then a start inside its range."""
        chosen = rng.choice(len(self.probabilities), size=count, p=self.probabilities)
        return rng.integers(self.begins[chosen], self.ends[chosen] - window + 1)
