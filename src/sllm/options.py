"""One declaration per setting: `option(default, help, range)` on a dataclass field.

The config sections and `SamplingParams` declare their fields with `option`; the CLI builds
its flags and help from the same metadata (`add_flag`), the server its request fields, and
validation its range checks, so a default, a description or a bound is written exactly once.
A `Range` is an interval with open or closed ends; NaN lies in none, so it fails every check.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, field
from typing import Any, Literal

from sllm.errors import UserError


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in; `None` leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def requirement(self) -> str:
        """What a value must do, for error messages: `be positive`, `be in [0, 1)`, ..."""
        if self.high is None and self.low == 0:
            return "be positive" if self.low_open else "not be negative"
        return f"be {self}" if self.high is None else f"be in {self}"

    def __str__(self) -> str:
        """`> 0`, `>= 1`, `[0, 1)`, ..."""
        if self.high is None and self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{low}, {high}{closing}"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
PROBABILITY = Range(0, 1, low_open=True)  # (0, 1]


def option(default: Any, help: str, range: Range | None = None) -> Any:
    """A dataclass field with its default, its one-line help and the range a number must lie in."""
    metadata = {"help": help, "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_range(key: str, value: Any, spec: Field) -> None:
    """UserError unless `value` (a number, or None where allowed) lies in `spec`'s range."""
    bounds = spec.metadata.get("range")
    if bounds is None or value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")
    if value not in bounds:
        raise UserError(f"{key} must {bounds.requirement()}, got {value}")


def add_flag(
    parser: argparse.ArgumentParser, flag: str, cls: type, name: str, note: str = "", **options: Any
) -> None:
    """`flag` for the field `name` of the dataclass `cls`: its help with `note`, its default (unless
    `options` set another) and its range; a list field repeats, a Literal one offers its values.
    Without a `type` in `options` values stay strings, for the dataclass's own checks to parse."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    default = options.get(
        "default", spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    )
    notes = [note] if note else []
    if default not in (None, "", []):
        notes.append(f"default: {default:,}" if type(default) is int else f"default: {default}")
    if spec.metadata["range"] is not None:
        notes.append(f"range: {spec.metadata['range']}")
    if typing.get_origin(hint) is list:
        options.setdefault("action", "append")
    elif typing.get_origin(hint) is Literal:
        options.setdefault("choices", typing.get_args(hint))
    help = f"{spec.metadata['help']} ({'; '.join(notes)})" if notes else spec.metadata["help"]
    parser.add_argument(flag, help=help.replace("%", "%%"), **options)


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def integer(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid integer value"
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {span}")
        return value

    return integer
