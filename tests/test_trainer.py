"""The run plan: derived values are written to plan.json and shown at the start, while the
config given to the trainer (and config.yaml) stays as the user wrote it; and the run
directory's module stays below the trainer."""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import yaml

import sllm
from sllm.train.trainer import train

from .conftest import tiny_config


def test_plan_is_written_and_the_config_is_left_as_given(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        prepared_dir, run_dir, "train.epochs=0.25", "train.micro_batch=auto", "train.batch_size=8"
    )
    given = copy.deepcopy(cfg)
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    assert cfg == given  # not even model.vocab_size, taken from the data, is written back

    plan = json.loads((run_dir / "plan.json").read_text())
    train_tokens = json.loads((prepared_dir / "meta.json").read_text())["splits"]["train"]["tokens"]
    assert plan["tokens_per_epoch"] == train_tokens and plan["tokens_per_step"] == 8 * 32
    assert plan["max_steps"] == result.step == math.ceil(0.25 * train_tokens / (8 * 32))
    assert plan["micro_batch"] * plan["grad_accum"] == plan["batch_size"] == 8
    assert f"plan: {plan['max_steps']:,} steps of 8 samples" in "\n".join(lines)

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 0.25 and saved["train"]["micro_batch"] == "auto"
    assert saved["train"]["max_steps"] == given.train.max_steps  # the default, unused with epochs
    assert saved["model"]["vocab_size"] == 512  # the model as built, so the run opens alone


def _sllm_imports(path: Path) -> set[str]:
    """Every `sllm.*` module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("sllm.")}


def test_the_run_directory_module_and_inference_do_not_import_the_trainer():
    source = Path(sllm.__file__).parent
    assert not {m for m in _sllm_imports(source / "run.py") if m.startswith(("sllm.train", "sllm.infer"))}
    for path in (source / "infer").glob("*.py"):
        assert not {m for m in _sllm_imports(path) if m.startswith("sllm.train")}, path
