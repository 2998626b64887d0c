"""Checking a prepared data directory's token shards against meta.json: token range and sha256;
`open_split` reads a split only through these checks.

Opening a split always compares shard sizes (`open_shards`). The content checks (every id below
vocab_size, so a hostile shard cannot index past the embedding; the recorded sha256) run once
per change of a shard: `verified.json` remembers each shard's size, mtime, inode, largest id and
hash, so later runs read nothing until a shard changes (unwritable directory: checked at every
open). `sllm data verify` checks all; `--update` records checksums older data lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import numpy as np

from sllm.atomic import write_text_atomic
from sllm.data.meta import SPLITS, DataMeta
from sllm.data.shards import TokenShards, open_shards
from sllm.errors import UserError
from sllm.files import FieldError, loads_json, sha256_file, typed
from sllm.tokenizer import load_tokenizer

STAMP_FILE = "verified.json"


@dataclass(frozen=True)
class ShardStamp:
    """What a check found in a shard, and the file state it found it in."""

    size: int
    mtime_ns: int
    inode: int
    max_id: int  # -1 for an empty shard
    sha256: str | None  # None where nothing needed the hash


def check_shards(
    data_dir: Path, meta: DataMeta, names: list[str], full: bool = False
) -> dict[str, ShardStamp]:
    """Check the shards `names` (`full`: re-read and hash all) and return their stamps."""
    stamps = _read_stamps(data_dir)
    found = dict(stamps)
    again = f"run `sllm prepare` for {data_dir} again"
    for name in names:
        path, recorded, stamp = data_dir / name, meta.checksums.get(name), stamps.get(name)
        if full or stamp is None or _state(path) != astuple(stamp)[:3] or (recorded and not stamp.sha256):
            stamp = found[name] = _check(path, meta.dtype, hashed=full or recorded is not None)
        if recorded and stamp.sha256 != recorded:
            raise UserError(f"{path} does not match its sha256 in meta.json (changed after prepare); {again}")
        if stamp.max_id >= meta.vocab_size:
            raise UserError(
                f"{path} holds token id {stamp.max_id}, outside the vocabulary of {meta.vocab_size:,} "
                f"(vocab_size in meta.json); {again}"
            )
    if found != stamps:
        with contextlib.suppress(OSError):  # a read-only dataset is checked at every open instead
            write_text_atomic(data_dir / STAMP_FILE, json.dumps({n: asdict(s) for n, s in found.items()}))
    return found


def _state(path: Path) -> tuple[int, int, int]:
    """What tells a changed file (a stamp's first fields): size, mtime and inode (new if replaced)."""
    status = path.stat()
    return status.st_size, status.st_mtime_ns, status.st_ino


def _check(path: Path, dtype: str, hashed: bool) -> ShardStamp:
    state = _state(path)  # taken first: a change during the check then shows at the next open
    tokens = np.memmap(path, dtype=dtype, mode="r") if state[0] else np.zeros(0, dtype)
    max_id = int(tokens.max()) if len(tokens) else -1
    return ShardStamp(*state, max_id, sha256_file(path) if hashed else None)


def _read_stamps(data_dir: Path) -> dict[str, ShardStamp]:
    """The stamps of earlier checks; a missing or damaged file (it is only a cache) is none."""
    try:
        return typed(loads_json((data_dir / STAMP_FILE).read_bytes().decode("utf-8")), dict[str, ShardStamp])
    except (OSError, ValueError, FieldError):
        return {}


def verify_data(data_dir: Path, update: bool = False) -> str:
    """`sllm data verify`: every file of a prepared data directory in full; a summary line."""
    meta = DataMeta.read(data_dir)
    tokenizer = load_tokenizer(data_dir)
    meta.check_tokenizer(data_dir, tokenizer.sha256, tokenizer.vocab_size)
    names = [name for split in SPLITS for name in meta.shards[split]]
    for split in SPLITS:
        open_shards(data_dir, meta.shards[split], meta.dtype, meta.splits[split].tokens, meta.shard_tokens)
    stamps = check_shards(data_dir, meta, names, full=True)
    unrecorded = [name for name in names if name not in meta.checksums]
    summary = f"{data_dir}: {len(names)} shards verified (sizes, token ids below {meta.vocab_size:,}"
    if not unrecorded:
        return summary + ", sha256)"
    if update:
        dataclasses.replace(meta, checksums={n: stamps[n].sha256 for n in names}).write(data_dir)
        return summary + f"); recorded the sha256 of {len(unrecorded)} in meta.json"
    return summary + f"); {len(unrecorded)} lack a sha256 in meta.json: `--update` records it"


def open_split(data_dir: str | Path, split: str, meta: DataMeta) -> np.ndarray | TokenShards:
    """The split's tokens, its shards (listed in meta.json, checked by `check_shards`) read as one array."""
    names, tokens = meta.shards[split], meta.splits[split].tokens
    shards = open_shards(Path(data_dir), names, meta.dtype, tokens, meta.shard_tokens)
    check_shards(Path(data_dir), meta, names)
    return shards
