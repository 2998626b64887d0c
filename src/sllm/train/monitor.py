"""Where training metrics go: metrics.jsonl always, TensorBoard when it is installed.

Each record is one JSON line written and flushed at once. When a run resumes from step S,
the records after S (written before a crash and about to be replayed) and any line cut short
by a kill are dropped first, so the file holds each step once and is valid line by line.
TensorBoard is optional: without the package the sink is skipped with a one-time note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sllm.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def _records_up_to(path: Path, step: int) -> str:
    """The complete, valid lines of `path` whose step is at most `step`."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    return "".join(kept)


class MetricSinks:
    """Metric destinations of rank 0; on other ranks (`enabled=False`) every call is a no-op."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        path = run_dir / METRICS_FILE
        if path.exists():
            write_text_atomic(path, _records_up_to(path, start_step))
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: tensorboard is not installed; metrics go to metrics.jsonl only",
                    file=sys.stderr,
                )
            else:
                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}, ensure_ascii=False) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
