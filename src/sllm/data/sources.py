"""Documents from raw files and Hugging Face datasets, one record at a time.

TXT, JSONL, JSON arrays, CSV/TSV and Parquet (a column or dotted path), optionally `.gz` or
`.zst`, from files, directories, globs and `hf:<name>`. Memory stays bounded by one record:
lines stream in binary (errors name file, line and byte offset), JSON arrays are parsed element
by element, Parquet by record batches. With `on_error="skip"` malformed records are skipped and
invalid UTF-8 replaced, both counted.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import importlib
import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sllm.errors import UserError
from sllm.files import JSON, loads_json_line
from sllm.tokenizer import replace_lone_surrogates

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
CSV_SUFFIXES = (".csv",)
TSV_SUFFIXES = (".tsv", ".tab")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = (
    TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + TSV_SUFFIXES + PARQUET_SUFFIXES
)
COMPRESSED_SUFFIXES = (".gz", ".zst")
HF_PREFIX = "hf:"
JSON_CHUNK_BYTES = 1 << 20
MAX_JSON_RECORD_CHARS = 256 << 20
PARQUET_BATCH_ROWS = 1024
CSV_FIELD_LIMIT = 2**31 - 1
DOWNLOAD_MANIFEST = "download.json"  # `sllm download`'s record beside its shards: not a document file


@dataclass(frozen=True)
class HFDataset:
    """An `hf:<name>` input: a hub name, a local dataset dir, or a `save_to_disk` dir."""

    name: str

    def __str__(self) -> str:
        return HF_PREFIX + self.name


Input = Path | HFDataset


@dataclass
class ReadOptions:
    """How to turn records into documents; mirrors the matching `data.*` config keys."""

    text_field: str = "text"
    txt_mode: str = "file"
    on_error: str = "raise"
    hf_config: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = True

    @classmethod
    def from_config(cls, data: Any) -> ReadOptions:
        return cls(**{name: getattr(data, name) for name in cls.__dataclass_fields__})


@dataclass
class SourceStats:
    """What reading the sources found, for prepare's summary."""

    documents: int = 0
    empty_documents: int = 0
    malformed_lines: int = 0
    invalid_utf8_lines: int = 0
    files: list[str] = field(default_factory=list)


def read_text_file(path: Path, what: str, expected: str) -> str:
    """A whole (small) file as text, a UTF-8 BOM dropped; missing, unreadable, non-UTF-8 or binary
    is one line naming the file."""
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise UserError(f"{what} {path} {state}; give {expected}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; convert it to UTF-8 (e.g. with iconv)") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    if "\x00" in text:  # as `prepare` refuses it: a binary file decodes, but is no text
        raise UserError(f"{what} {path} looks like a binary file (NUL byte); give {expected}")
    return text


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    for compression in COMPRESSED_SUFFIXES:
        if name.endswith(compression):
            return Path(name[: -len(compression)]).suffix
    return path.suffix.lower()


def expand_inputs(inputs: list[str]) -> list[Input]:
    """Files, directories (searched recursively for known suffixes), globs and `hf:` names."""
    if not inputs:
        raise UserError("no input files given; pass --input FILE (or set data.inputs)")
    found: list[Input] = []
    for item in inputs:
        path = Path(item)
        if item.startswith(HF_PREFIX):
            found.append(HFDataset(item[len(HF_PREFIX) :]))
        elif path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and _base_suffix(p) in KNOWN_SUFFIXES and p.name != DOWNLOAD_MANIFEST
            )
            if not files:
                raise UserError(f"directory {path} holds no {', '.join(KNOWN_SUFFIXES)} files")
            found.extend(files)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(f"no file matches {item!r}; check the pattern")
            found.extend(matched)
        else:
            raise UserError(f"input file {item} not found; check the path (or write hf:NAME for a dataset)")
    return found


def require_module(module: str, purpose: str, extra: str = "data") -> Any:
    """Import an optional dependency, or say which of sllm's extras installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{purpose} needs the `{package}` package; pip install 'sllm[{extra}]'") from None


@contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed; a failing read (a truncated archive too) names the file."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        if path.name.endswith(".gz"):
            handle: BinaryIO = gzip.open(path, "rb")  # type: ignore[assignment]  # noqa: SIM115
        elif path.name.endswith(".zst"):
            zstandard = require_module("zstandard", f"reading {path}")
            errors += (zstandard.ZstdError,)
            reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
            handle = io.BufferedReader(reader)
        else:
            handle = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        try:
            yield handle
        except errors as exc:
            raise UserError(f"cannot read {path}: {exc}") from None


def _lines(path: Path, on_error: str, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with UTF-8 and binary checks; line numbers start at 1."""
    offset = 0
    with _reading(path) as handle:
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


def _text_chunks(path: Path, on_error: str) -> Iterator[str]:
    """The decoded text of a file in chunks of about JSON_CHUNK_BYTES."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if on_error == "skip" else "strict")
    offset = 0
    with _reading(path) as handle:
        while chunk := handle.read(JSON_CHUNK_BYTES):
            if b"\x00" in chunk:
                raise UserError(f"{path} looks like a binary file (NUL byte near byte {offset})")
            try:
                yield decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}: invalid UTF-8 near byte {offset + exc.start}; "
                    "convert the file to UTF-8 or set data.on_error=skip to replace bad bytes"
                ) from None
            offset += len(chunk)
        yield decoder.decode(b"", final=True)


def _record_text(record: Any, text_field: str) -> tuple[str | None, str | None]:
    """The text at `text_field` (a key, else a dotted path; null is empty), or a problem description."""
    if isinstance(record, dict) and isinstance(value := record.get(text_field), str):
        return replace_lone_surrogates(value), None  # the usual record, without the general walk
    if not isinstance(record, dict):
        return None, "the record is not a JSON object"
    keys = [text_field] if text_field in record else text_field.split(".")
    value: Any = record
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            fields = ", ".join(value if isinstance(value, dict) else {}) or "none"
            where = "" if depth == 0 else f" under {'.'.join(keys[:depth])!r}"
            return None, f"no string field {text_field!r} (fields{where}: {fields}); set --text-field"
        value = value[key]
    if value is None:
        return "", None
    if not isinstance(value, str):
        return None, f"field {text_field!r} holds a {type(value).__name__}, not a string"
    return replace_lone_surrogates(value), None


def _txt_documents(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[str]:
    lines = (line for _, line in _lines(path, options.on_error, stats))
    if options.txt_mode == "file":
        yield "".join(lines)
        return
    for filled, paragraph in itertools.groupby(lines, key=lambda line: bool(line.strip())):
        if filled:
            yield "".join(paragraph).rstrip("\r\n")


def _texts_of_records(
    path: Path, records: Iterable[tuple[str, Any]], options: ReadOptions, stats: SourceStats
) -> Iterator[str]:
    """Text of each (location, record); bad records stop with an error or are skipped."""
    for where, record in records:
        text, problem = _record_text(record, options.text_field)
        if text is not None:
            yield text
        elif options.on_error == "skip":
            stats.malformed_lines += 1
        else:
            raise UserError(f"{path}:{where}: {problem}; fix the record or set data.on_error=skip")


def _jsonl_records(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    for number, line in _lines(path, options.on_error, stats):
        if not line.strip():
            continue
        try:
            yield str(number), loads_json_line(line)
        except json.JSONDecodeError as exc:
            if options.on_error != "skip":
                raise UserError(
                    f"{path}:{number}: malformed JSON ({exc.msg}); fix the line or set data.on_error=skip"
                ) from None
            stats.malformed_lines += 1


_JSON_SPACE = re.compile(r"[ \t\r\n]*")


def _json_array_items(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, decoded one at a time as chunks arrive."""
    buffer, pos, count = "", 0, 0
    state = "start"  # start → value-or-end → separator → value → ... → end
    for chunk in _text_chunks(path, options.on_error):
        buffer, pos = buffer[pos:] + chunk, 0
        while (pos := _JSON_SPACE.match(buffer, pos).end()) < len(buffer):  # type: ignore[union-attr]
            char = buffer[pos]
            if state == "start" and char == "[":
                state, pos = "value-or-end", pos + 1
            elif state in ("value-or-end", "separator") and char == "]":
                state, pos = "end", pos + 1
            elif state == "separator" and char == ",":
                state, pos = "value", pos + 1
            elif state in ("value-or-end", "value"):
                try:
                    value, pos = JSON.raw_decode(buffer, pos)
                except json.JSONDecodeError:
                    if len(buffer) - pos > MAX_JSON_RECORD_CHARS:
                        _json_problem(path, buffer, pos, count)
                    break  # the element continues in the next chunk
                count += 1
                state = "separator"
                yield f"record {count}", value
            else:
                _json_problem(path, buffer, pos, count, state)
    if (pos := _JSON_SPACE.match(buffer, pos).end()) < len(buffer) or state != "end":  # type: ignore[union-attr]
        _json_problem(path, buffer, pos, count, state)


def _json_problem(path: Path, buffer: str, pos: int, count: int, state: str = "value") -> None:
    if state == "start":
        raise UserError(f"{path} is not a JSON array of objects; use .jsonl for one object per line")
    if state == "end":
        raise UserError(f"{path}: unexpected text after the closing ] of the JSON array; fix the file")
    reason = "expected , or ] between records"
    if pos < len(buffer) and state != "separator":
        try:
            JSON.raw_decode(buffer, pos)
        except json.JSONDecodeError as exc:
            reason, pos = exc.msg, exc.pos
    if pos >= len(buffer):
        raise UserError(f"{path}: the JSON array ends early (after record {count}); the file is truncated")
    raise UserError(f"{path}: malformed JSON after record {count} ({reason}); fix the file")


def _csv_records(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    """Rows as dicts keyed by the header; TSV has no quoting (quotes are ordinary characters)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)  # long documents in one cell are normal here
    lines = (line for _, line in _lines(path, options.on_error, stats))
    if _base_suffix(path) in TSV_SUFFIXES:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    _text_column(path, options.text_field, header)
    try:
        for row in reader:
            yield f"line {reader.line_num}", dict(zip(header, row, strict=False))
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV near line {reader.line_num} ({exc}); fix the file") from None


def _parquet_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Rows of the text column (only that column is read), one record batch at a time."""
    if path.name.endswith(COMPRESSED_SUFFIXES):
        raise UserError(f"{path}: Parquet compresses inside the file; decompress it to a .parquet file")
    parquet = require_module("pyarrow.parquet", f"reading {path}")
    try:
        reader = parquet.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable"
        raise UserError(f"cannot read {path} as Parquet: {str(exc).splitlines()[0]}") from None
    column = _text_column(path, options.text_field, reader.schema_arrow.names)
    row = 0
    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield f"row {row}", {column: value}


def _text_column(source: Input, text_field: str, columns: list[str]) -> str:
    """The column holding `text_field`: itself, or the first part of a dotted path."""
    column = text_field if text_field in columns else text_field.split(".")[0]
    if column not in columns:
        raise UserError(
            f"{source} has no column {text_field!r} (columns: {', '.join(columns)}); set --text-field"
        )
    return column


def _hf_dataset(source: HFDataset, options: ReadOptions) -> Any:
    datasets = require_module("datasets", f"reading {source}")
    local = Path(source.name)
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if options.hf_split not in dataset:
                    splits = ", ".join(dataset)
                    raise UserError(
                        f"{source} has no split {options.hf_split!r} (splits: {splits}); set data.hf_split"
                    )
                dataset = dataset[options.hf_split]
            return dataset
        return datasets.load_dataset(
            source.name, options.hf_config, split=options.hf_split, streaming=options.hf_streaming
        )
    except UserError:
        raise
    except Exception as exc:  # hub, network and format errors of many kinds: all mean "cannot load"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot load dataset {source}: {reason}; check the name, data.hf_config and data.hf_split "
            "(offline, only cached or saved datasets load)"
        ) from None


def _hf_records(source: HFDataset, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    dataset = _hf_dataset(source, options)
    if dataset.column_names is not None:  # a streamed dataset may not know its columns
        dataset = dataset.select_columns([_text_column(source, options.text_field, dataset.column_names)])
    for row, record in enumerate(dataset, start=1):
        yield f"row {row}", record


def _documents_of(source: Input, options: ReadOptions, stats: SourceStats) -> Iterator[str]:
    if isinstance(source, HFDataset):
        return _texts_of_records(Path(str(source)), _hf_records(source, options), options, stats)
    suffix = _base_suffix(source)
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(source, options, stats)
    elif suffix in JSON_SUFFIXES:
        records = _json_array_items(source, options)
    elif suffix in CSV_SUFFIXES + TSV_SUFFIXES:
        records = _csv_records(source, options, stats)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(source, options)
    else:
        return _txt_documents(source, options, stats)
    return _texts_of_records(source, records, options, stats)


def read_documents(sources: list[Input], options: ReadOptions, stats: SourceStats) -> Iterator[str]:
    """Every non-empty document of every source, in order. Counts go into `stats`."""
    for source in sources:
        stats.files.append(str(source))
        for text in _documents_of(source, options, stats):
            if text.strip():
                stats.documents += 1
                yield text
            else:
                stats.empty_documents += 1
