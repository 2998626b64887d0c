"""Crash-safe file system steps shared by prepare and checkpoints.

A directory is built under a temp name and renamed into place. Replacing an existing one
takes two renames (old → aside, new → target); a crash between them leaves the complete old
version aside, and `recover_dir` puts it back. Leftover temp and aside directories from
killed processes are removed before new work starts (one writer per target is assumed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sllm.errors import UserError

TEMP_MARK = ".tmp-"
ASIDE_MARK = ".old-"


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


DEFAULT_FILE_MODE = _default_file_mode()  # what open() gives a new file under this umask


def temp_path(target: Path) -> Path:
    return target.parent / f".{target.name}{TEMP_MARK}{os.getpid()}"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its dir is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` to `target`; an existing target is removed only afterwards."""
    aside = target.parent / f".{target.name}{ASIDE_MARK}{os.getpid()}"
    if target.exists():
        os.replace(target, aside)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo a replacement cut short by a crash, and drop leftovers of killed writers."""
    asides = sorted(target.parent.glob(f".{target.name}{ASIDE_MARK}*"))
    if asides and not target.exists():
        os.replace(asides[-1], target)
        asides = asides[:-1]
    for leftover in [*asides, *target.parent.glob(f".{target.name}{TEMP_MARK}*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def recover_all(directory: Path) -> None:
    """`recover_dir` for every target in `directory` that has leftovers (ours alone live there)."""
    names = set()
    for leftover in directory.glob(".*"):
        for mark in (ASIDE_MARK, TEMP_MARK):
            if mark in leftover.name:
                names.add(leftover.name[1 : leftover.name.rindex(mark)])
    for name in sorted(names):
        recover_dir(directory / name)


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create `path` if needed and prove a file can be written there, or explain why not."""
    probe = path / f".write-test{TEMP_MARK}{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write the {what} to {path}: {exc.strerror}; choose another location"
        ) from None


@contextmanager
def atomic_text_writer(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text handle whose content appears at `path` only once the block ends without an
    error (written to a temp name, fsynced, renamed); an error removes the temp file."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_text_writer(path) as handle:
        handle.write(text)
