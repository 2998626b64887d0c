"""`sllm report RUN [RUN...]`: plots and a markdown summary of one run or several side by side.

Curves are drawn against tokens seen, so runs with different batch sizes line up; the summary
lists differing config keys, best validation loss, median throughput and the last samples.
matplotlib (lazy, Agg backend) falls back to an installed Hangul font for Korean run names;
with none, one note names the fix instead of a warning per missing glyph.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from sllm.errors import UserError
from sllm.files import loads_json
from sllm.run import METRICS_FILE, SAMPLES_DIR, read_run_config

CURVES = (("loss", "train loss"), ("val_loss", "validation loss"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens / s"))  # fmt: skip
HANGUL_FONTS = (
    "Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans KR",
    "Source Han Sans KR", "Source Han Sans K", "Source Han Sans", "NanumGothic", "NanumBarunGothic",
    "Malgun Gothic", "Apple SD Gothic Neo", "AppleGothic", "UnDotum",
)  # fmt: skip
CJK_CHARACTER = re.compile("[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u9fff\uac00-\ud7af]")
NO_HANGUL_FONT_NOTE = (
    "note: no font with Hangul is installed, so Korean labels in the plots show as boxes; "
    "install one (Debian: fonts-noto-cjk or fonts-nanum)"
)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The numeric fields of each record with a step; damaged lines are left out, not fatal."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}; is it a run directory?")
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line a kill cut short: resume drops it
            records.append(loads_json(line))
    numeric = (
        {key: value for key, value in record.items() if type(value) in (int, float)}
        for record in records
        if isinstance(record, dict)
    )
    return [record for record in numeric if "step" in record]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(runs: list[Path]) -> dict[str, list[Any]]:
    """Config keys whose values are not the same in every run (paths of the runs excluded)."""
    flats = [_flatten(read_run_config(run).to_dict()) for run in runs]
    keys = sorted(set().union(*flats) - {"train.out_dir"})
    return {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1}


def _installed_font_families() -> set[str]:
    from matplotlib import font_manager

    return {font.name for font in font_manager.fontManager.ttflist}


def hangul_font() -> str | None:
    """The first installed font of `HANGUL_FONTS` (all have Hangul; the CJK ones Hanzi and kana too)."""
    installed = _installed_font_families()
    return next((name for name in HANGUL_FONTS if name in installed), None)


def _plot(runs: list[Path], metrics: dict[Path, list[dict]], out_dir: Path) -> list[Path]:
    """The curves, with a Hangul font after the default (matplotlib >= 3.6 falls back per glyph)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = hangul_font()
    if font is not None:
        with plt.rc_context({"font.family": [*plt.rcParams["font.family"], font]}):
            return _draw(runs, metrics, out_dir)
    with warnings.catch_warnings():
        if any(CJK_CHARACTER.search(run.name) for run in runs):
            print(NO_HANGUL_FONT_NOTE, file=sys.stderr)
            warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        return _draw(runs, metrics, out_dir)


def _draw(runs: list[Path], metrics: dict[Path, list[dict]], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for key, title in CURVES:
        figure, axes = plt.subplots(figsize=(7, 4))
        for run in runs:
            points = [(m["tokens"], m[key]) for m in metrics[run] if key in m and "tokens" in m]
            if points:
                axes.plot(*zip(*points, strict=True), label=run.name, marker=".")
        axes.set_xlabel("tokens seen")
        axes.set_title(title)
        if axes.lines:
            axes.legend()
        else:  # e.g. runs without evaluations have no validation curve
            axes.text(0.5, 0.5, f"no {title} recorded in these runs", ha="center", transform=axes.transAxes)
        axes.grid(alpha=0.3)
        path = out_dir / f"{key}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def _summary(runs: list[Path], metrics: dict[Path, list[dict]], plots: list[Path], out_dir: Path) -> str:
    lines = [
        "# Run report",
        "",
        "| run | steps | tokens | best val loss | median tokens/s |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        records = metrics[run]
        val = [m["val_loss"] for m in records if "val_loss" in m]
        rates = [m["tokens_per_s"] for m in records if "tokens_per_s" in m]
        last = max((m for m in records if "tokens" in m), key=lambda m: m["step"], default={})
        best = f"{min(val):.4f}" if val else "–"
        rate = f"{statistics.median(rates):,.0f}" if rates else "–"
        lines.append(
            f"| {run.name} | {last.get('step', 0):,} | {last.get('tokens', 0):,} | {best} | {rate} |"
        )
    differences = config_differences(runs) if len(runs) > 1 else {}
    if differences:
        lines += ["", "## Config differences", "", "| key | " + " | ".join(r.name for r in runs) + " |"]
        lines.append("|---|" + "---|" * len(runs))
        lines += [
            f"| {k} | " + " | ".join(str(v) for v in values) + " |" for k, values in differences.items()
        ]
    lines += ["", "## Curves", ""] + [f"![{p.stem}]({p.relative_to(out_dir)})" for p in plots]
    for run in runs:
        samples = sorted((run / SAMPLES_DIR).glob("step-*.md"))
        last = samples[-1].read_text(encoding="utf-8") if samples else "(no samples)"
        lines += ["", f"## Last samples of {run.name}", "", last]
    return "\n".join(lines) + "\n"


def write_report(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write `report.md` and `plots/*.png` into `out` (default: the first run's directory)."""
    run_dirs = [Path(r) for r in runs]
    for run in run_dirs:
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist")
    out_dir = Path(out) if out else run_dirs[0]
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    metrics = {run: read_metrics(run) for run in run_dirs}
    plots = _plot(run_dirs, metrics, plots_dir)
    report = out_dir / "report.md"
    report.write_text(_summary(run_dirs, metrics, plots, out_dir), encoding="utf-8")
    return report
