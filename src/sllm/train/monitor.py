"""Where training metrics go: metrics.jsonl always; TensorBoard and Weights & Biases on request.

Each JSONL record is one line written and flushed at once. When a run resumes from step S,
the records after S (written before a crash and about to be replayed) and any line cut short
by a kill are dropped first, so the file holds each step once and is valid line by line;
TensorBoard purges the same steps, and W&B continues the same run (its id is kept in the run
directory). Optional sinks import their package lazily: TensorBoard missing is a note,
W&B missing (when asked for) is a clear error.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from sllm.atomic import write_text_atomic
from sllm.config import Config
from sllm.errors import UserError
from sllm.files import loads_json, read_text
from sllm.run import METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE


class Sink:
    """A destination of metrics; what a sink does not keep (text, files) it ignores."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def text(self, step: int, name: str, text: str) -> None: ...
    def files(self, name: str, kind: str, paths: list[Path]) -> None: ...
    def close(self) -> None: ...


def _records_up_to(path: Path, step: int) -> str:
    """The complete, valid lines of `path` up to `step` (a kill may have cut the last one)."""
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True):
        try:
            record = loads_json(line)
        except json.JSONDecodeError:
            continue
        recorded = record.get("step", 0) if isinstance(record, dict) else None
        if line.endswith("\n") and type(recorded) is int and recorded <= step:
            kept.append(line)
    return "".join(kept)


class JsonlSink(Sink):
    def __init__(self, run_dir: Path, start_step: int) -> None:
        path = run_dir / METRICS_FILE
        if path.exists():
            write_text_atomic(path, _records_up_to(path, start_step))
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.handle.write(json.dumps({"step": step, **metrics}, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class TensorBoardSink(Sink):
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.close()


def check_sinks_available(cfg: Config) -> None:
    """A configured sink that cannot work is one line before the run directory is made."""
    if cfg.log.wandb:
        _import_wandb()


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError:
        raise UserError(
            "log.wandb is on but wandb is not installed; `pip install wandb` (the tested range: "
            '`pip install -e ".[wandb]"`)'
        ) from None
    return wandb


class WandbSink(Sink):
    """Metrics, samples and versioned artifacts in W&B (`WANDB_MODE=offline` works as usual)."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.wandb = wandb = _import_wandb()
        id_file = run_dir / WANDB_ID_FILE
        run_id = (
            read_text(id_file, f"delete {id_file} to start a new W&B run").strip()
            if id_file.is_file()
            else secrets.token_hex(8)
        )
        write_text_atomic(id_file, run_id + "\n")  # a kill mid-write must not lose the id
        self.run = wandb.init(
            project=cfg.log.wandb_project, name=run_dir.name, id=run_id, resume="allow",
            dir=str(run_dir), config=cfg.to_dict(),
        )  # fmt: skip

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def files(self, name: str, kind: str, paths: list[Path]) -> None:
        artifact = self.wandb.Artifact(name, type=kind)
        for path in paths:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Every configured sink of rank 0; on other ranks (`enabled=False`) calls do nothing."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, enabled: bool = True) -> None:
        self.sinks: list[Sink] = []
        if not enabled:
            return
        self.sinks.append(JsonlSink(run_dir, start_step))
        if cfg.log.tensorboard:
            try:
                self.sinks.append(TensorBoardSink(run_dir, start_step))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        if cfg.log.wandb:
            self.sinks.append(WandbSink(run_dir, cfg))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def text(self, step: int, name: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(step, name, text)

    def files(self, name: str, kind: str, paths: list[Path]) -> None:
        """Versioned copies of run files, where a sink keeps them (W&B artifacts)."""
        for sink in self.sinks:
            sink.files(name, kind, paths)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
