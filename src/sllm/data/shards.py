"""Token shards: each split is a series of files of a fixed token count, read as one array.

A split's stream is cut into `train-00000.bin`, ... of exactly `shard_tokens` tokens (the last
shorter), so the cut depends only on the token position: a writer's state is the tokens written
so far, resuming truncates the open shard back to it, and the shards equal a single-file
prepare. `TokenShards` presents them as one read-only array for the loaders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sllm.errors import UserError


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends tokens to a split's shards, starting a new file every `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, tokens: int = 0):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.tokens = tokens
        self.finished_shards = 0
        self._handle: Any = None
        self._restore()

    def _restore(self) -> None:
        """Make the files on disk hold exactly `self.tokens` tokens (after an interruption)."""
        full, rest = divmod(self.tokens, self.shard_tokens)
        for index in range(full):
            path = self.directory / shard_name(self.split, index)
            if not path.is_file() or path.stat().st_size != self.shard_tokens * self.dtype.itemsize:
                raise ValueError(f"shard {path} is missing or has the wrong size")
        for stale in self.directory.glob(f"{self.split}-*.bin"):
            index = int(stale.stem.rsplit("-", 1)[1])
            if index > full or (index == full and not rest):
                stale.unlink()
        self.finished_shards = full
        if rest:
            current = self.directory / shard_name(self.split, full)
            if not current.is_file() or current.stat().st_size < rest * self.dtype.itemsize:
                raise ValueError(f"shard {current} is shorter than the recorded progress")
            self._handle = open(current, "r+b")  # noqa: SIM115
            self._handle.truncate(rest * self.dtype.itemsize)
            self._handle.seek(0, os.SEEK_END)

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._handle is None:
                path = self.directory / shard_name(self.split, self.tokens // self.shard_tokens)
                self._handle = open(path, "wb")  # noqa: SIM115
            room = self.shard_tokens - self.tokens % self.shard_tokens
            part, tokens = tokens[:room], tokens[room:]
            self._handle.write(part.data)  # not tofile: its OSError loses the errno
            self.tokens += len(part)
            if self.tokens % self.shard_tokens == 0:
                self._close_current()
                self.finished_shards += 1

    def sync(self) -> None:
        """Make everything written so far durable (before progress is recorded)."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def _close_current(self) -> None:
        self.sync()
        self._handle.close()
        self._handle = None

    def close(self) -> list[str]:
        """Finish the split; its shard file names in order (one empty shard for an empty split)."""
        if self._handle is not None:
            self._close_current()
        count = -(-self.tokens // self.shard_tokens)
        if count == 0:
            (self.directory / shard_name(self.split, 0)).touch()
            count = 1
        return [shard_name(self.split, index) for index in range(count)]


class TokenShards:
    """Several token files read as one array: `len`, integer slices, `np.asarray`."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("token shards support contiguous slices only")
        begin, end, _ = key.indices(len(self))
        if begin >= end:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        pieces = []
        while begin < end:
            local = begin - int(self.offsets[first])
            take = min(end, int(self.offsets[first + 1])) - begin
            pieces.append(self.parts[first][local : local + take])
            begin += take
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)


def open_shards(
    directory: Path, names: list[str], dtype: str, tokens: int, shard_tokens: int
) -> np.ndarray | TokenShards:
    """The shards as one array (a single shard: its plain memmap). Every shard but the last holds
    `shard_tokens`, all `tokens`: another size means truncated or overwritten, refused."""
    parts = []
    for index, name in enumerate(names):
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} not found; run `sllm prepare` for {directory} again")
        expected = tokens - index * shard_tokens if index == len(names) - 1 else shard_tokens
        if path.stat().st_size != expected * np.dtype(dtype).itemsize:
            raise UserError(
                f"{path} is damaged: {path.stat().st_size:,} bytes where meta.json promises "
                f"{expected:,} tokens of {dtype}; run `sllm prepare` for {directory} again"
            )
        try:
            parts.append(np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype))
        except OSError as exc:  # exists, right size, but unreadable (permissions, I/O error)
            raise UserError(
                f"cannot read {path}: {exc.strerror}; check its permissions or the disk"
            ) from None
    return parts[0] if len(parts) == 1 else TokenShards(parts)
