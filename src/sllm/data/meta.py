"""The prepared-data format: `meta.json` as the `DataMeta` dataclass, read, written and validated here.

Everything that reads a prepared data directory goes through `DataMeta.read`, which checks every
field's type (`sllm.files.typed`) and the cross-field rules (dtype fits the vocabulary, EOS
inside it, one shard list per split); a problem is a `UserError` naming the file, field and fix.
Format version 1 (before shards) still loads, each `<split>.bin` as one shard.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sllm.atomic import write_text_atomic
from sllm.errors import UserError
from sllm.files import FieldError, kind_of, read_json, typed

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    """The token files' element type: uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class SplitCounts:
    """What one split (or one source's share of it) holds; tokens include one EOS per document."""

    documents: int
    tokens: int
    bytes: int


@dataclass(frozen=True)
class SourceEntry:
    """One named source: its counts, its token range in the train split, its share of training."""

    name: str
    split: str
    weight: float
    files: list[str]
    splits: dict[str, SplitCounts]
    train_range: tuple[int, int]
    natural_share: float
    sampling_share: float


@dataclass(frozen=True)
class CleaningCounts:
    """Documents kept, and how many each cleaning step changed or dropped."""

    kept: int
    changed: dict[str, int]
    dropped: dict[str, int]


@dataclass(frozen=True)
class InputFile:
    """One input as fingerprinted: its path and size (None for a dataset named on the hub)."""

    path: str
    bytes: int | None


@dataclass(frozen=True)
class DataMeta:
    """The contents of a prepared data directory's meta.json, in its on-disk key order."""

    format_version: int
    tokenizer_sha256: str
    dtype: str
    vocab_size: int
    eos_id: int
    splits: dict[str, SplitCounts]
    shard_tokens: int
    shards: dict[str, list[str]]
    sources: list[SourceEntry]
    skipped: dict[str, int]
    cleaning: CleaningCounts | None
    fingerprint: dict[str, Any]
    # sha256 per shard file name; absent from data prepared before checksums (size checks only)
    checksums: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, data_dir: str | Path) -> DataMeta:
        """The validated meta.json of `data_dir`."""
        path = Path(data_dir) / META_FILE
        if not path.is_file():
            raise UserError(f"{data_dir} is not a prepared data directory (no meta.json); run `sllm prepare`")
        return cls.from_json(read_json(path, "run `sllm prepare` again"), path)

    @classmethod
    def from_json(cls, document: Any, path: Path) -> DataMeta:
        """Parsed JSON → a validated DataMeta; `path` only names the file in errors."""
        if not isinstance(document, dict):
            raise _invalid(path, f"it holds {kind_of(document)} instead of a JSON object")
        version = document.get("format_version")
        if type(version) is not int:
            raise _invalid(path, "format_version is missing or not an integer")
        if version not in READABLE_VERSIONS:
            raise UserError(
                f"{path} has format version {version}, which this sllm does not read (it reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}); run `sllm prepare` again or upgrade sllm"
            )
        if version == 1:
            document = _from_version_1(document)
        try:
            meta = typed(document, cls)
        except FieldError as exc:
            raise _invalid(path, str(exc)) from None
        meta.validate(path)
        return meta

    def check_tokenizer(self, data_dir: Path, sha256: str, vocab_size: int) -> None:
        """The directory's tokenizer.json must be the one recorded here, of vocab_size tokens."""
        if sha256 != self.tokenizer_sha256:
            raise UserError(
                f"{data_dir / 'tokenizer.json'} does not match its meta.json; run `sllm prepare` again"
            )
        if vocab_size != self.vocab_size:
            problem = f"vocab_size {self.vocab_size:,} is not the {vocab_size:,} tokens of tokenizer.json"
            raise _invalid(Path(data_dir) / META_FILE, problem)

    def validate(self, path: Path) -> None:
        """The rules between fields; `path` names the file in the error."""
        problem = self._problem()
        if problem:
            raise _invalid(path, problem)

    def _problem(self) -> str | None:
        if self.vocab_size < 1:
            return f"vocab_size {self.vocab_size} is not positive"
        expected_dtype = token_dtype(self.vocab_size).name
        if self.dtype != expected_dtype:
            return (
                f"dtype {self.dtype} does not match vocab_size {self.vocab_size:,} "
                f"(prepare stores it as {expected_dtype}: uint16 up to 65,536 tokens, else uint32)"
            )
        if not 0 <= self.eos_id < self.vocab_size:
            return f"eos_id {self.eos_id} is outside the vocabulary of {self.vocab_size:,} tokens"
        if set(self.splits) != set(SPLITS) or set(self.shards) != set(SPLITS):
            return f"splits and shards must each list exactly {', '.join(SPLITS)}"
        if self.shard_tokens < 1:
            return f"shard_tokens {self.shard_tokens} is not positive"
        for split, counts in self.splits.items():
            if min(counts.documents, counts.tokens, counts.bytes) < 0:
                return f"splits.{split} has a negative count"
            outside = [n for n in self.shards[split] if Path(n).name != n or n in ("", ".", "..")]
            if outside:
                return f"shards.{split} names {outside[0]!r}, which is not a file name inside the directory"
            wanted = max(1, -(-counts.tokens // self.shard_tokens))
            if len(self.shards[split]) != wanted:
                return (
                    f"shards.{split} lists {len(self.shards[split])} files where {counts.tokens:,} tokens "
                    f"in shards of {self.shard_tokens:,} need {wanted}"
                )
        if not isinstance(self.fingerprint.get("inputs"), list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("path"), str)
            for entry in self.fingerprint["inputs"]
        ):
            return "fingerprint.inputs must be a list of objects with a string path"
        return None

    def write(self, data_dir: str | Path) -> None:
        """Write meta.json into `data_dir` atomically (after checking the cross-field rules)."""
        path = Path(data_dir) / META_FILE
        self.validate(path)
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False))

    def input_files(self) -> list[InputFile]:
        """The fingerprinted inputs with their sizes (a local dataset dir: its files' total)."""
        return [InputFile(entry["path"], _input_bytes(entry)) for entry in self.fingerprint["inputs"]]


def _input_bytes(entry: dict[str, Any]) -> int | None:
    if "files" in entry:
        return sum(_input_bytes(file) or 0 for file in entry["files"])
    return entry.get("bytes")


def _from_version_1(document: dict[str, Any]) -> dict[str, Any]:
    """A version 1 meta.json (one `<split>.bin` per split) in the shape of the current version."""
    splits = document.get("splits")
    if not isinstance(splits, dict):
        return document  # the type walk names the problem
    sizes = [c.get("tokens") for c in splits.values() if isinstance(c, dict)]
    return {
        "shard_tokens": max([1, *(n for n in sizes if type(n) is int)]),
        "shards": {split: [f"{split}.bin"] for split in splits},
        "sources": [],
        "cleaning": None,
        **document,
    }


def _invalid(path: Path, problem: str) -> UserError:
    return UserError(f"{path} is invalid: {problem}; run `sllm prepare` again")
