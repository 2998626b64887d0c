"""Where training metrics go: metrics.jsonl always, TensorBoard when it is installed.

Each record is one JSON line written and flushed at once, so the file stays valid line by
line even if the process is killed. TensorBoard is optional: without the package the sink
is skipped with a one-time note rather than failing the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricSinks:
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.jsonl = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: tensorboard is not installed; metrics go to metrics.jsonl only",
                    file=sys.stderr,
                )
            else:
                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
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
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
