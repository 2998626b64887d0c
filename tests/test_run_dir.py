"""The run directory is the user's: prepare replaces only its own files, LATEST cannot lead
out of the run, one `sllm train` at a time per run directory, and a run that cannot fit in
memory is refused before anything is allocated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sllm.cli import main
from sllm.config import load_config
from sllm.data.prepare import prepare
from sllm.errors import UserError
from sllm.run import load_latest
from sllm.train import memory_check
from sllm.train.distributed import Cluster
from sllm.train.memory_check import require_memory
from sllm.train.objectives import LanguageModeling
from sllm.train.trainer import train

from .conftest import constitution_paragraphs, tiny_config, write_jsonl

SRC = str(Path(__file__).parents[1] / "src")


def _quiet(_):
    pass


# ---- prepare touches only its own files ---------------------------------------------------


def test_rerun_of_prepare_with_changed_input_keeps_the_users_files(tmp_path):
    lines = constitution_paragraphs()
    out = tmp_path / "d"

    def prepare_from(texts: list[str]) -> None:
        corpus = write_jsonl(tmp_path / "corpus.jsonl", texts)
        cfg = load_config(None, [f"data.inputs={json.dumps([str(corpus)])}", f"data.dir={out}",
                                 "data.val_ratio=0.1", "data.test_ratio=0.1", "tokenizer.vocab_size=300",
                                 "data.shard_tokens=20000"])  # fmt: skip
        prepare(cfg.data, cfg.tokenizer, log=_quiet)

    prepare_from(lines + lines[::-1])
    assert (out / "train-00002.bin").is_file()
    (out / "notes.txt").write_text("my notes")
    (out / "analysis").mkdir()
    (out / "analysis" / "counts.csv").write_text("a,b\n")
    (out / "train.bin.bak").write_text("a backup of mine")

    prepare_from(lines)  # changed input: a smaller dataset with fewer shards
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "analysis" / "counts.csv").read_text() == "a,b\n"
    assert (out / "train.bin.bak").read_text() == "a backup of mine"
    assert not (out / "train-00002.bin").exists()  # ours, from the old input: gone
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.glob("*-0*.bin")) == sorted(
        n for names in meta["shards"].values() for n in names
    )


# ---- LATEST names a checkpoint of this run ------------------------------------------------


@pytest.fixture
def two_runs(tmp_path, trained_run) -> tuple[Path, Path]:
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(trained_run, mine)
    shutil.copytree(trained_run, other)
    return mine, other


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/step-000090", "ABSOLUTE", "SYMLINK"])
def test_latest_leading_out_of_the_run_is_refused(two_runs, pointer, capsys):
    mine, other = two_runs
    checkpoints = mine / "checkpoints"
    if pointer == "ABSOLUTE":
        pointer = str(other / "checkpoints" / "step-000090")
    elif pointer == "SYMLINK":
        (checkpoints / "step-000999").symlink_to(other / "checkpoints" / "step-000090")
        pointer = "step-000999"
    (checkpoints / "LATEST").write_text(pointer + "\n")
    with pytest.raises(UserError, match=r"LATEST names '.*', which is not a checkpoint of this run"):
        load_latest(mine)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--run", str(mine), "--prompt", "a", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "not a checkpoint of this run" in err


def test_latest_naming_one_of_the_runs_checkpoints_is_followed(two_runs):
    mine, _ = two_runs
    (mine / "checkpoints" / "LATEST").write_text("step-000090\n")
    assert load_latest(mine).step == 90


# ---- one trainer per run directory ------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from sllm.atomic import directory_lock
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
with directory_lock(Path(sys.argv[1]) / ".lock", "training run"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    return holder


def test_second_train_on_the_same_out_is_refused_naming_the_holder(tmp_path, prepared_dir, capsys):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(
            UserError, match=rf"{run_dir} is in use by another training run \(process {holder.pid}\)"
        ):
            train(tiny_config(prepared_dir, run_dir, "train.max_steps=2"), log=_quiet)
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock is stale at once
        holder.wait()
    assert train(tiny_config(prepared_dir, run_dir, "train.max_steps=2"), log=_quiet).step == 2
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"


def _train_failing_in(method: str, monkeypatch, prepared_dir: Path, run_dir: Path) -> None:
    """Train until `Trainer.<method>` refuses; the refusal must reach the caller."""

    def refuse(self):
        raise UserError(f"refused in {method}")

    monkeypatch.setattr(f"sllm.train.trainer.Trainer.{method}", refuse)
    with pytest.raises(UserError, match=f"refused in {method}"):
        train(tiny_config(prepared_dir, run_dir, "train.max_steps=2"), log=_quiet)
    monkeypatch.undo()


def test_lock_is_released_when_training_fails(tmp_path, prepared_dir, monkeypatch):
    run_dir = tmp_path / "run"
    _train_failing_in("resume", monkeypatch, prepared_dir, run_dir)
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    holder = _hold_lock(run_dir)  # would not get it if the failed run still held it
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_train_refuses_an_out_that_is_not_a_run_and_leaves_its_files(tmp_path, prepared_dir, capsys):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.yaml").write_text("my: own settings\n")
    (own / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(prepared_dir), "--out", str(own), "train.max_steps=1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert (
        f"{own} exists and is not an sllm run (it holds config.yaml, notes.txt); choose another --out" in err
    )
    assert sorted(p.name for p in own.iterdir()) == ["config.yaml", "notes.txt"]
    assert (own / "config.yaml").read_text() == "my: own settings\n"


def test_a_run_stopped_before_its_first_plan_is_still_ours(tmp_path, prepared_dir, monkeypatch):
    run_dir = tmp_path / "run"
    _train_failing_in("settle_micro_batch", monkeypatch, prepared_dir, run_dir)
    assert not (run_dir / "plan.json").exists() and (run_dir / "tokenizer.json").exists()
    assert train(tiny_config(prepared_dir, run_dir, "train.max_steps=2"), log=_quiet).step == 2


# ---- memory ---------------------------------------------------------------------------


def test_impossible_model_is_refused_before_allocating(tmp_path, prepared_dir, monkeypatch, capsys):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 24 * 10**9)
    wide = ["model.n_layer=200", "model.n_embd=8192", "model.n_head=64"]
    with pytest.raises(UserError) as refused:
        train(tiny_config(prepared_dir, tmp_path / "run", *wide), log=_quiet)
    message = str(refused.value)
    # 200 blocks of 12·8192² weights: 161e9 parameters, 4 bytes each for weights and gradients, 8 for AdamW
    assert message.startswith("this run does not fit in memory: training needs about 2,6")
    assert (
        "(weights 644.3" in message and "gradients 644.3" in message and "optimizer state 1,288.7" in message
    )
    assert message.endswith(
        "but the cpu has 24.00 GB available; choose a smaller model (model.n_layer, model.n_embd)"
    )
    assert not (tmp_path / "run").exists()


def test_activations_that_do_not_fit_suggest_a_smaller_batch(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 10**9)
    with pytest.raises(
        UserError,
        match=r"activations [\d.]+ GB at micro-batch 4096\) .* lower train.micro_batch \(or let --find-batch",
    ):
        train(tiny_config(prepared_dir, tmp_path / "run", "train.micro_batch=4096"), log=_quiet)


def _lm(prepared_dir: Path, *overrides: str) -> tuple[LanguageModeling, object]:
    cfg = load_config(None, [f"data.dir={prepared_dir}", *overrides])
    return LanguageModeling(cfg), cfg.train


SHAPES = {  # name: n_layer, n_head, n_embd, block_size, micro_batch
    "demo": (4, 4, 128, 128, 16),
    "10m": (6, 4, 256, 256, 8),
}  # fmt: skip


def _shape(n_layer: int, n_head: int, n_embd: int, block_size: int, micro_batch: int) -> list[str]:
    return [f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
            f"model.block_size={block_size}", f"train.micro_batch={micro_batch}"]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_small_presets_fit_in_a_small_machine(prepared_dir, monkeypatch, shape):
    """The demo and a 10M model train in fp32 on the CPU with half a gigabyte to spare."""
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 500 * 10**6)
    objective, t = _lm(prepared_dir, *_shape(*SHAPES[shape]))
    require_memory(objective, t, t.micro_batch, torch.device("cpu"), None, Cluster(0, 0, 1))


def test_on_a_gpu_the_free_device_memory_is_the_budget(prepared_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 10**6, 80 * 10**9))
    objective, t = _lm(prepared_dir, *_shape(*SHAPES["demo"]))
    with pytest.raises(UserError, match=r"but the cuda has 0.00 GB available"):
        require_memory(objective, t, 16, torch.device("cuda", 0), torch.bfloat16, Cluster(0, 0, 1))


def test_fsdp_shards_the_model_state_over_the_processes(prepared_dir, monkeypatch):
    objective, t = _lm(
        prepared_dir, "model.n_layer=8", "model.n_embd=512", "model.n_head=8", "train.parallel=fsdp"
    )
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 300 * 10**6)
    with pytest.raises(UserError, match="choose a smaller model"):
        require_memory(objective, t, 1, torch.device("cpu"), torch.bfloat16, Cluster(0, 0, 1))
    require_memory(objective, t, 1, torch.device("cpu"), torch.bfloat16, Cluster(0, 0, 4))
