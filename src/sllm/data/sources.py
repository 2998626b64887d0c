"""Documents from raw text files: TXT and JSONL, plain or gzip-compressed; files, dirs, globs.

Files are streamed line by line in binary so memory stays bounded and so a bad byte or a
malformed line can be reported with its file, line and byte offset. With `on_error="skip"`
malformed JSON lines are skipped and invalid UTF-8 is replaced; both are counted.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sllm.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES


@dataclass
class SourceStats:
    """What reading the sources found, for prepare's summary."""

    documents: int = 0
    empty_documents: int = 0
    malformed_lines: int = 0
    invalid_utf8_lines: int = 0
    files: list[str] = field(default_factory=list)


def _base_suffix(path: Path) -> str:
    return Path(path.name[:-3]).suffix.lower() if path.name.endswith(".gz") else path.suffix.lower()


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for known suffixes) and globs, in stable order."""
    if not inputs:
        raise UserError("no input files given; pass --input FILE (or set data.inputs)")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in KNOWN_SUFFIXES)
            if not found:
                raise UserError(f"directory {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(f"no file matches {item!r}; check the pattern")
            files.extend(matched)
        else:
            raise UserError(f"input file {item} not found; check the path")
    return files


def _open_binary(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def _lines(path: Path, on_error: str, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with UTF-8 and binary checks; line numbers start at 1."""
    offset = 0
    with _open_binary(path) as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if b"\x00" in raw:
                    raise UserError(f"{path} looks like a binary file (NUL byte at line {number})")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if on_error != "skip":
                        raise UserError(
                            f"{path}: invalid UTF-8 at byte {offset + exc.start} (line {number}); "
                            "convert the file to UTF-8 or set data.on_error=skip to replace bad bytes"
                        ) from None
                    stats.invalid_utf8_lines += 1
                    line = raw.decode("utf-8", errors="replace")
                offset += len(raw)
                yield number, line
        except (OSError, EOFError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None


def _txt_documents(path: Path, mode: str, on_error: str, stats: SourceStats) -> Iterator[str]:
    if mode == "file":
        yield "".join(line for _, line in _lines(path, on_error, stats))
        return
    block: list[str] = []
    for _, line in _lines(path, on_error, stats):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _jsonl_documents(path: Path, text_field: str, on_error: str, stats: SourceStats) -> Iterator[str]:
    for number, line in _lines(path, on_error, stats):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg})"
        else:
            if not isinstance(record, dict):
                problem = "the line is not a JSON object"
            elif not isinstance(record.get(text_field), str):
                fields = ", ".join(record) or "none"
                problem = f"no string field {text_field!r} (fields: {fields}); set --text-field"
        if problem is None:
            yield record[text_field]
        elif on_error == "skip":
            stats.malformed_lines += 1
        else:
            raise UserError(f"{path}:{number}: {problem}; fix the line or set data.on_error=skip")


def read_documents(
    files: list[Path], text_field: str, txt_mode: str, on_error: str, stats: SourceStats
) -> Iterator[str]:
    """Every non-empty document of every file, in order. Counts go into `stats`."""
    for path in files:
        stats.files.append(str(path))
        if _base_suffix(path) in JSONL_SUFFIXES:
            documents = _jsonl_documents(path, text_field, on_error, stats)
        else:
            documents = _txt_documents(path, txt_mode, on_error, stats)
        for text in documents:
            if text.strip():
                stats.documents += 1
                yield text
            else:
                stats.empty_documents += 1
