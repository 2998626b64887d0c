"""Crash-safe file system steps shared by prepare and checkpoints.

A directory is built under a temp name and renamed into place; replacing one takes two renames
(old → aside, new → target), and `recover_dir` puts a complete old version back after a crash
between them. A full disk while writing becomes one `UserError` naming the directory
(`writing_to`), however torch or safetensors wrapped the OSError. A run directory is locked
with `flock` (`directory_lock`): the kernel drops it when its holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sllm.errors import UserError

TEMP_MARK = ".tmp-"
ASIDE_MARK = ".old-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    """A UTF-8 text handle whose content appears at `path` (fsynced, renamed) only if the block succeeds."""
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


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no space, no time), else a copy."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def carry_over(old: Path, new: Path, ours: Callable[[str], bool]) -> None:
    """Link into `new` every entry of `old` that `ours(name)` does not claim, to keep a user's files."""
    for entry in old.iterdir() if old.is_dir() else []:
        if ours(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, new / entry.name)


def disk_full_errno(error: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG if behind `error` (torch.save wraps the OSError in a RuntimeError,
    safetensors writes `(os error 28)`)."""
    for _ in range(8):  # a chain of causes and contexts, bounded in case it loops
        if error is None or isinstance(error, UserError):  # explained already
            return None
        for code in DISK_FULL_ERRNOS:
            if getattr(error, "errno", None) == code or f"(os error {code})" in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(
    directory: Path, what: str, needed_bytes: int | None = None, code: int = errno.ENOSPC
) -> UserError:
    """The one line for a full disk: where, what, the space there is (and is needed)."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    free_mb = shutil.disk_usage(existing).free / 1e6
    need = f"need {needed_bytes / 1e6:,.1f} MB, " if needed_bytes else ""
    return UserError(
        f"the disk is full ({os.strerror(code)}): cannot write the {what} in {directory} ({need}"
        f"{free_mb:,.1f} MB free); free some space and run the same command again: it goes on "
        "from what was saved before, which is intact"
    )


@contextmanager
def writing_to(directory: Path, what: str, needed_bytes: int | None = None) -> Iterator[None]:
    """A write inside the block that finds the disk full becomes `disk_full_error`."""
    try:
        yield
    except Exception as error:
        code = disk_full_errno(error)
        if code is None:
            raise
        raise disk_full_error(Path(directory), what, needed_bytes, code) from None


@contextmanager
def directory_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_file` (our PID inside) for the block, or name its holder."""
    handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(
                f"{lock_file.parent} is in use by another {what} (process {holder}); wait for it to "
                "finish or stop it, or choose another --out"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
