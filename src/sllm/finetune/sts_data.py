"""STS sentence pairs from KorSTS TSV or KLUE-STS JSON files, format auto-detected.

A file starting with `[` is KLUE-STS JSON; anything else is TSV with a header naming `score`,
`sentence1` and `sentence2`, split on tabs and newlines literally (a CSV dialect would swallow
KorSTS's `"` across lines, `splitlines` would break at form feeds). Rows without a score in
[0, 5] are skipped and reported; fewer than two usable rows is a `UserError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sllm.data.sources import read_text_file
from sllm.errors import UserError
from sllm.files import loads_json

MAX_SCORE = 5.0
TSV_COLUMNS = ("score", "sentence1", "sentence2")
EXAMPLES_SHOWN = 3


@dataclass
class StsPair:
    sentence1: str
    sentence2: str
    score: float


@dataclass
class StsData:
    """The usable pairs of one file, and the rows skipped with the reason for each."""

    path: Path
    format: str
    pairs: list[StsPair]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {len(self.pairs):,} pairs ({self.format})"
        if self.skipped:
            shown = "; ".join(self.skipped[:EXAMPLES_SHOWN])
            text += f", skipped {len(self.skipped):,} rows without a usable score (first: {shown})"
        return text


def load_sts(path: str | Path) -> StsData:
    """Read a KorSTS TSV or KLUE-STS JSON file; raise one clear `UserError` if it is unusable."""
    path = Path(path)
    text = read_text_file(path, "STS file", "a KorSTS .tsv or KLUE-STS .json file")
    if text.lstrip().startswith("["):
        data = StsData(path, "KLUE-STS JSON", [])
        rows = _klue_rows(path, text)
    else:
        data = StsData(path, "KorSTS TSV", [])
        rows = _tsv_rows(path, text)
    for where, sentence1, sentence2, raw_score in rows:
        score = _parse_score(raw_score)
        if score is None:
            data.skipped.append(f"{where} score {raw_score!r}")
        else:
            data.pairs.append(StsPair(sentence1, sentence2, score))
    if len(data.pairs) < 2:
        raise UserError(f"STS file {path} has fewer than 2 pairs with a score in [0, 5]; check the file")
    return data


def _parse_score(raw: object) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        return None
    try:
        score = float(raw)
    except ValueError:
        return None
    return score if math.isfinite(score) and 0.0 <= score <= MAX_SCORE else None


def _tsv_rows(path: Path, text: str) -> Iterator[tuple[str, str, str, str]]:
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # not splitlines(): see below
    if not lines[0].strip():
        raise UserError(f"STS file {path} is empty; give a KorSTS .tsv or KLUE-STS .json file")
    header = lines[0].split("\t")
    missing = [name for name in TSV_COLUMNS if name not in header]
    if missing:
        raise UserError(
            f"STS file {path} is neither a JSON array nor a TSV with the columns "
            f"{', '.join(TSV_COLUMNS)} (missing {', '.join(missing)}); check its header"
        )
    score_at, first_at, second_at = (header.index(name) for name in TSV_COLUMNS)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserError(
                f"{path} line {number} has {len(fields)} tab-separated fields, the header has "
                f"{len(header)}; fix that line"
            )
        yield f"line {number}", fields[first_at], fields[second_at], fields[score_at].strip()


def _klue_rows(path: Path, text: str) -> Iterator[tuple[str, str, str, object]]:
    try:
        records = loads_json(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"STS file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise UserError(f"STS file {path} must hold a JSON array of sentence pairs")
    for number, record in enumerate(records):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("sentence1", "sentence2")
        ):
            raise UserError(
                f"{path} record {number} lacks the text fields sentence1 and sentence2; fix that record"
            )
        labels = record.get("labels")
        score = labels.get("label") if isinstance(labels, dict) else None
        yield f"record {number}", record["sentence1"], record["sentence2"], score
