"""`sllm queue FILE`: run a list of training experiments one after another.

Each non-comment line of FILE holds the arguments of one `sllm train` command, or a whole
`finetune sft|sts ...` command. Every run is its own process, so a crash or a bad config
fails that line alone and the queue goes on. Because every run resumes from LATEST and says
when it is already finished (all objectives share one trainer), running a queue again skips
finished runs and resumes interrupted ones. A status file beside FILE
records each line's outcome as it happens. Ctrl-C reaches the running training process
too, which saves a checkpoint and exits; the queue then stops without starting the next.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from sllm.atomic import write_text_atomic
from sllm.errors import UserError


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
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    """The `sllm` command of a line: a fine-tuning as written, anything else `sllm train`."""
    words = shlex.split(entry.arguments)
    return words if words[:1] == ["finetune"] else ["train", *words]


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


def run_queue(queue_file: str | Path) -> list[QueueEntry]:
    path = Path(queue_file)
    entries = read_queue(path)
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
