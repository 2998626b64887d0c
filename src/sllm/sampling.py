"""`SamplingParams`: the one declaration of the sampling options, their defaults and ranges.

`TextGenerator.generate`, the config's `sample` section, the flags of `sllm generate` and `chat`
and the fields of `sllm serve`'s requests are all built from these fields; options left out
take a run's `sample` section. No torch here (the logits arithmetic is `sllm.infer.logits`), so
the config and the CLI import it at once without the inference package.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from sllm.errors import UserError
from sllm.options import FRACTION, NON_NEGATIVE, PROBABILITY, Range, check_range, option

MAX_STOP_STRINGS = 8
PENALTY = Range(-2, 2)  # OpenAI's range for the presence and frequency penalties
# Below this a temperature is greedy: dividing logits by less could overflow float32. The ranges
# keep every accepted value finite in float32; beyond them a setting would change nothing more.
GREEDY_BELOW = 1e-5
TEMPERATURE = Range(0, 100)
REPETITION_PENALTY = Range(0.01, 100)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = option(64, "most tokens generated per prompt", NON_NEGATIVE)
    min_new_tokens: int = option(
        0, "tokens generated before EOS or a one-token stop string may end the text", NON_NEGATIVE
    )
    temperature: float = option(
        0.8, f"softmax temperature; 0 (or below {GREEDY_BELOW:g}) is greedy", TEMPERATURE
    )
    top_k: int = option(50, "keep the k most likely tokens; 0 disables", NON_NEGATIVE)
    top_p: float = option(
        0.95, "keep the most likely tokens up to this probability mass; 1 disables", PROBABILITY
    )
    min_p: float = option(
        0.0, "keep tokens at least this share as likely as the likeliest; 0 disables", FRACTION
    )
    repetition_penalty: float = option(
        1.0, "divide logits of tokens already seen, prompt included, by this; 1 disables", REPETITION_PENALTY
    )
    presence_penalty: float = option(
        0.0, "subtract this from logits of tokens generated; 0 disables", PENALTY
    )
    frequency_penalty: float = option(
        0.0, "subtract this per earlier generation of a token from its logit; 0 disables", PENALTY
    )
    seed: int | None = option(
        None, "seed of the draws; unset: a fresh one each time", Range(0, 2**63, high_open=True)
    )
    stop: tuple[str, ...] = option(
        (), f"strings that end the text, cut before the first (at most {MAX_STOP_STRINGS})"
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(SamplingParams)
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            _check_type(spec.name, value, hints[spec.name])
            check_range(spec.name, value, spec)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_config(cls, sample: typing.Any) -> SamplingParams:
        """The options a config's `sample` section holds, with its seed (that of the samples)."""
        return cls(**{name: getattr(sample, name) for name in RUN_OPTIONS}, seed=sample.seed)


def run_defaults(sample: typing.Any) -> SamplingParams:
    """The options a user leaves out: the run's `sample` section without its samples' seed."""
    return dataclasses.replace(SamplingParams.from_config(sample), seed=None)


# The options a run's `sample` section holds; the seed and the stop strings belong to one use.
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("seed", "stop"))
# What each option but the stop strings is parsed as from text (a CLI flag, chat's `/set`).
OPTION_TYPES: dict[str, type] = {
    name: int if int in (hint, *typing.get_args(hint)) else float
    for name, hint in typing.get_type_hints(SamplingParams).items()
    if name != "stop"
}


def _check_type(name: str, value: object, expected: object) -> None:
    """Integers must be integers and numbers numbers (a bool is neither); None only where allowed."""
    if value is None and type(None) in typing.get_args(expected):
        return
    if int in (expected, *typing.get_args(expected)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{name} must be an integer, got {value!r}")
    elif expected is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise UserError(f"{name} must be a number, got {value!r}")
