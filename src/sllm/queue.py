"""`sllm queue FILE`: run a list of training experiments one after another.

Each non-comment line holds the arguments of one `sllm train` (a config file and overrides) or a
whole `finetune sft|sts ...` command. Every line is checked before any runs and all bad lines are
reported at once, so a typo on line 3 does not wait for line 2's hour of training. Each run is
its own process (a crash fails that line alone) and resumes from LATEST, so running a queue again
skips finished runs and resumes interrupted ones. A status file beside FILE records each line's
outcome; Ctrl-C lets the running training save a checkpoint, then the queue stops.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from sllm.atomic import write_text_atomic
from sllm.config import config_from_args
from sllm.data.meta import DataMeta
from sllm.errors import UserError
from sllm.files import read_text


@dataclass
class QueueEntry:
    line: int
    arguments: str
    status: str = "pending"
    exit_code: int | None = None
    seconds: float = 0.0


def read_queue(path: Path) -> list[QueueEntry]:
    if not path.is_file():
        raise UserError(f"queue file {path} not found")
    entries = []
    for number, raw in enumerate(read_text(path, "save the queue file as UTF-8 text").splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if text:
            try:
                shlex.split(text)
            except ValueError as exc:
                raise UserError(f"{path}:{number}: cannot parse the arguments ({exc})") from None
            entries.append(QueueEntry(number, text))
    if not entries:
        raise UserError(f"queue file {path} lists no experiments (one `sllm train` argument list per line)")
    return entries


def _save_status(queue_file: Path, entries: list[QueueEntry]) -> None:
    status = queue_file.with_name(queue_file.name + ".status.json")
    write_text_atomic(status, json.dumps([asdict(e) for e in entries], indent=2))


def sllm_arguments(entry: QueueEntry) -> list[str]:
    """The `sllm` command of a line: a fine-tuning as written, a config file or anything else `train`."""
    words = shlex.split(entry.arguments)
    if words[:1] == ["finetune"]:
        return words
    return ["train", "--config", *words] if words[0].endswith((".yaml", ".yml")) else ["train", *words]


def check_queue(path: Path, entries: list[QueueEntry], parse: Callable[[list[str]], Namespace]) -> None:
    """Every line parsed (`parse`: the CLI's parser) and checked; one error lists all bad lines."""
    problems, run_dirs = [], {}
    for entry in entries:
        try:
            _check_line(parse(sllm_arguments(entry)), entry.line, run_dirs)
        except UserError as error:
            problems.append(f"line {entry.line}: {error}")
    if problems:
        count = f"{len(problems)} bad line{'s' if len(problems) > 1 else ''}"
        raise UserError(
            f"{path} has {count}, so nothing ran; fix them and run again: " + " | ".join(problems)
        )


def _check_line(args: Namespace, line: int, run_dirs: dict[Path, int]) -> None:
    """What one line needs before it can run; `run_dirs`: the lines above by run directory, which a
    fine-tuning or `train.init_from` may start from. Torch is imported only where needed."""
    if args.command == "train":
        cfg = config_from_args(args)
        DataMeta.read(cfg.data.dir)
        base, out = cfg.train.init_from, Path(cfg.train.out_dir)
    else:
        from sllm.finetune.sft import sft_config
        from sllm.finetune.sts import sts_config

        sft = args.finetune_command == "sft"
        (sft_config if sft else sts_config)(args.overrides)
        for name in ["data"] if sft else ["train", "dev"]:
            if not Path(getattr(args, name)).is_file():
                raise UserError(f"--{name} {getattr(args, name)} is not a file; check the path")
        base, out = args.run, Path(args.out)
    if base and Path(base).resolve() not in run_dirs:
        from sllm.run import read_run_config

        read_run_config(Path(base))
    if out.resolve() in run_dirs:
        raise UserError(f"run directory {out} is also line {run_dirs[out.resolve()]}'s; give each its own")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"run directory {out}: {existing} is not a writable directory; choose another")
    run_dirs[out.resolve()] = line


def _run_one(entry: QueueEntry) -> tuple[int, bool]:
    """Run one training command, echoing its output; (exit code, was it already finished)."""
    command = [sys.executable, "-m", "sllm", *sllm_arguments(entry)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    already_finished = False
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        already_finished |= "already finished" in line
    return process.wait(), already_finished


def run_queue(queue_file: str | Path, parse: Callable[[list[str]], Namespace]) -> list[QueueEntry]:
    path = Path(queue_file)
    entries = read_queue(path)
    check_queue(path, entries, parse)
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for entry in entries:
            if interrupted:
                break
            print(f"\n=== queue line {entry.line}: sllm {shlex.join(sllm_arguments(entry))}", flush=True)
            entry.status = "running"
            _save_status(path, entries)
            started = time.perf_counter()
            entry.exit_code, already_finished = _run_one(entry)
            entry.seconds = round(time.perf_counter() - started, 1)
            if interrupted:
                entry.status = "interrupted"
            elif entry.exit_code == 0:
                entry.status = "skipped: finished before" if already_finished else "done"
            else:
                entry.status = "failed"
            _save_status(path, entries)
    finally:
        signal.signal(signal.SIGINT, previous)
    print("\n" + summary_table(entries))
    return entries


def summary_table(entries: list[QueueEntry]) -> str:
    rows = [f"{'line':>4}  {'status':<24} {'exit':>4} {'seconds':>8}  arguments"]
    for e in entries:
        code = "" if e.exit_code is None else str(e.exit_code)
        rows.append(f"{e.line:>4}  {e.status:<24} {code:>4} {e.seconds:>8.1f}  {e.arguments}")
    return "\n".join(rows)
