"""A disk that fills up under every writer: `sllm train`, `prepare` and `export` stop with one
line and exit code 2, leave the previous checkpoint or dataset intact and no temp files, and
the same command, once there is space again, finishes as an uninterrupted run would.

`SmallDisk` makes a directory full after a byte budget: every write through `open` (pathlib,
the atomic writers, the shard writer, `torch.save` into a file object) counts, and so does
`safetensors`' save, which writes from Rust and is replaced here by the same bytes written
through `open` (failing with safetensors' own error). A `slow` test repeats the training case
on a real tmpfs where the machine lets us mount one.
"""

from __future__ import annotations

import builtins
import errno
import filecmp
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from sllm.cli import main
from sllm.config import save_config
from sllm.run import load_latest, verify_checkpoint

from ..conftest import constitution_paragraphs, tiny_config, write_jsonl


class _CountedFile:
    """A real file whose writes are logged by the disk, and fail once it is full."""

    def __init__(self, handle, disk: SmallDisk, path: str) -> None:
        self._handle, self._disk, self._path = handle, disk, path

    def write(self, data):
        if self._disk.fills_with(self._path):
            if "b" in self._handle.mode:  # a full disk takes what fits: half, say
                self._handle.write(memoryview(data).cast("B")[: memoryview(data).nbytes // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


class SmallDisk:
    """Files under `root` go to a disk that is full from the `n`-th write to a path containing
    `fragment` on (`full_at=(fragment, n)`; None: never, the writes are only logged)."""

    def __init__(self, monkeypatch, root: Path, full_at: tuple[str, int] | None = None) -> None:
        self.root, self.full_at, self.full = str(root), full_at, False
        self.log: list[str] = []  # the path of every write, in order
        real_open = io.open

        def counted_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
            if path.startswith(self.root) and any(flag in mode for flag in "wax+"):
                return _CountedFile(handle, self, path)
            return handle

        def counted_save_file(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            try:
                with counted_open(filename, "wb") as handle:
                    handle.write(data)
            except OSError as error:  # what safetensors raises, with no OSError behind it
                message = f"Error while serializing: I/O error: {error.strerror} (os error {error.errno})"
                raise SafetensorError(message) from None

        monkeypatch.setattr(builtins, "open", counted_open)
        monkeypatch.setattr(io, "open", counted_open)
        monkeypatch.setattr("sllm.train.checkpoint.save_file", counted_save_file)

    def fills_with(self, path: str) -> bool:
        """Log a write to `path`; whether the disk is full by now."""
        self.log.append(path)
        if self.full_at and not self.full:
            fragment, n = self.full_at
            self.full = fragment in path and self.writes_to(fragment) == n
        return self.full

    def writes_to(self, fragment: str) -> int:
        return sum(fragment in path for path in self.log)


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`sllm ARGV` in this process: its exit code and its stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_line_disk_full(code: int, err: str, directory: Path) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("sllm: error: the disk is full (No space left on device)"), err
    assert str(directory) in lines[0] and "run the same command again" in lines[0]
    assert "Traceback" not in err


def _no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def train_config(tmp_path_factory, prepared_dir) -> Path:
    """4 steps, checkpoints at 2 and 4, an evaluation (and `best/`) at 4."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    steps = [
        "train.max_steps=4",
        "train.checkpoint_interval=2",
        "train.eval_interval=4",
        "train.log_interval=1",
    ]
    save_config(
        tiny_config(prepared_dir, "unused", *steps, "train.eval_windows=2", "train.keep_last=2"), path
    )
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_config) -> tuple[Path, SmallDisk]:
    """A run on a disk that never fills, and the log of its writes."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        disk = SmallDisk(monkeypatch, run_dir.parent)
        main(["train", "--config", str(train_config), "--out", str(run_dir)])
    return run_dir, disk


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same final weights and the same metrics records, each step's once."""
    resumed, straight = load_latest(run_dir).model_state(), load_latest(reference).model_state()
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    steps = [
        [json.loads(line)["step"] for line in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (run_dir, reference)
    ]
    assert steps[0] == steps[1]


# Each writer of a training run, failing in its last write: the second checkpoint's files (the
# first must then verify), LATEST, the metrics, and the config and plan written at the start.
SLOW_WRITES = ("step-000004.tmp-", "metrics.jsonl", "config.yaml", "plan.json")
TRAINING_WRITES = ["model.safetensors", "state.pt", "LATEST"]
TRAINING_WRITES += [pytest.param(writer, marks=pytest.mark.slow) for writer in SLOW_WRITES]


@pytest.mark.parametrize("writer", TRAINING_WRITES)
def test_full_disk_in_each_training_writer_stops_cleanly_and_resumes_exactly(
    tmp_path, monkeypatch, capsys, train_config, uninterrupted, writer
):
    reference, log = uninterrupted
    disk = SmallDisk(monkeypatch, tmp_path, full_at=(writer, log.writes_to(writer)))
    run_dir = tmp_path / "run"
    command = ["train", "--config", str(train_config), "--out", str(run_dir)]
    code, err = _run_cli(capsys, *command)
    assert disk.full
    _assert_one_line_disk_full(code, err, run_dir)
    _no_temp_files(run_dir)
    if writer not in ("config.yaml", "plan.json"):  # written before any checkpoint
        assert load_latest(run_dir).step in (2, 4)
        for checkpoint in (run_dir / "checkpoints").glob("step-*"):
            verify_checkpoint(checkpoint)

    monkeypatch.undo()  # space is freed
    assert _run_cli(capsys, *command)[0] == 0
    _assert_same_run(run_dir, reference)


def _prepare_command(corpus: Path, out: Path) -> list[str]:
    return ["prepare", "--input", str(corpus), "--out", str(out), "tokenizer.vocab_size=300",
            "--val-ratio", "0.1", "--test-ratio", "0.1", "--shard-tokens", "20000"]  # fmt: skip


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two versions of a corpus, and the second prepared without trouble."""
    root = tmp_path_factory.mktemp("corpora")
    lines = constitution_paragraphs()
    v1, v2 = write_jsonl(root / "v1.jsonl", lines), write_jsonl(root / "v2.jsonl", lines + lines[::-1])
    main(_prepare_command(v2, root / "straight"))
    return v1, v2, root / "straight"


@pytest.mark.parametrize("writer", ["train-00001.bin", "progress.json", "meta.json", "tokenizer.json"])
def test_full_disk_in_prepare_keeps_the_old_dataset_and_resumes_to_identical_output(
    tmp_path, monkeypatch, capsys, corpora, writer
):
    v1, v2, straight = corpora
    out = tmp_path / "data" / "d"
    assert _run_cli(capsys, *_prepare_command(v1, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    disk = SmallDisk(monkeypatch, out.parent, full_at=(writer, 1))
    code, err = _run_cli(capsys, *_prepare_command(v2, out))
    assert disk.full
    _assert_one_line_disk_full(code, err, out.parent)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old dataset is intact
    _no_temp_files(out.parent)

    monkeypatch.undo()
    assert _run_cli(capsys, *_prepare_command(v2, out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    for path in straight.iterdir():
        assert filecmp.cmp(path, out / path.name, shallow=False), path.name
    assert not list(out.parent.glob(".*"))  # the unfinished work was resumed and moved in


def test_full_disk_during_export_leaves_nothing_and_the_rerun_completes(
    tmp_path, monkeypatch, capsys, trained_run
):
    out = tmp_path / "exports" / "hf"
    disk = SmallDisk(monkeypatch, out.parent, full_at=("config.json", 1))
    code, err = _run_cli(capsys, "export", "--run", str(trained_run), "--out", str(out))
    assert disk.full
    _assert_one_line_disk_full(code, err, out.parent)
    assert not list(out.parent.iterdir())
    monkeypatch.undo()
    assert _run_cli(capsys, "export", "--run", str(trained_run), "--out", str(out))[0] == 0
    assert (out / "model.safetensors").is_file()


def test_full_disk_under_any_other_writer_is_still_one_line(tmp_path, monkeypatch, capsys, trained_run):
    """`sllm report` has no directory of its own to name: the CLI's last resort speaks."""
    disk = SmallDisk(monkeypatch, tmp_path, full_at=("report.md", 1))
    code, err = _run_cli(capsys, "report", str(trained_run), "--out", str(tmp_path))
    assert disk.full and code == 2
    assert err == (
        "sllm: error: the disk is full (No space left on device); free some space and run the same "
        "command again\n"
    )


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return shutil.which("mount") is not None and subprocess.run(command, capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_real_full_file_system_stops_training_cleanly_and_the_rerun_matches(
    tmp_path, train_config, uninterrupted
):
    """A tmpfs with room for few files (the kernel's ENOSPC when a file is created, wherever the
    count runs out) under a run checkpointing every step; then more room and the same command.
    Needs root in a container that allows `mount`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    failures = 0
    for inodes in (6, 12, 18):  # each runs out at another writer
        disk = tmp_path / f"tmpfs-{inodes}"
        if not _mount_tmpfs(disk, f"size=64m,nr_inodes={inodes}"):
            pytest.skip("cannot mount a tmpfs here (needs root in a container that allows it)")
        try:
            run_dir = disk / "run"
            command = [sys.executable, "-m", "sllm", "train", "--config", str(train_config), "--out",
                       str(run_dir), "train.checkpoint_interval=1", "train.keep_last=20"]  # fmt: skip
            first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
            if first.returncode == 0:
                continue
            failures += 1
            assert first.returncode == 2, first.stderr
            lines = first.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("sllm: error: the disk is full"), first.stderr
            _no_temp_files(run_dir)
            for checkpoint in (run_dir / "checkpoints").glob("step-*") if run_dir.is_dir() else []:
                verify_checkpoint(checkpoint)
            subprocess.run(["mount", "-o", "remount,nr_inodes=100000", str(disk)], check=True)
            second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
            assert second.returncode == 0, second.stderr
            _assert_same_run(run_dir, uninterrupted[0])
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)
    assert failures == 3
