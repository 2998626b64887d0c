"""Shared fixtures: a small real corpus (the konlpy constitution), a tokenizer, prepared data
and a briefly trained run, each built once per session to keep the suite fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sllm.config import Config, load_config
from sllm.demo import demo_corpus
from sllm.tokenizer import Tokenizer, load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def constitution_paragraphs() -> list[str]:
    text = (Path(demo_corpus()[0]) / "constitution.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "constitution.jsonl", constitution_paragraphs())


def tiny_config(data_dir: Path | str, run_dir: Path | str, *overrides: str) -> Config:
    """A model small enough that a training step takes milliseconds on one core."""
    return load_config(
        None,
        [
            f"data.dir={data_dir}",
            f"train.out_dir={run_dir}",
            "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
            "train.micro_batch=8", "train.max_steps=40", "train.warmup_steps=5",
            "train.lr=1e-2", "train.min_lr=1e-3", "train.eval_interval=20", "train.eval_windows=8",
            "train.checkpoint_interval=10", "train.log_interval=5", "train.device=cpu",
            "log.progress=false", "log.tensorboard=false", "sample.max_new_tokens=8",
            *overrides,
        ],
    )  # fmt: skip


def prepare_corpus(corpus: Path, data_dir: Path, *overrides: str) -> Path:
    """Prepare `corpus` into `data_dir` with the default config plus `overrides`, quietly."""
    from sllm.data.prepare import prepare

    cfg = load_config(None, [f"data.inputs={json.dumps([str(corpus)])}", f"data.dir={data_dir}", *overrides])
    prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    return data_dir


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_file) -> Path:
    data_dir = tmp_path_factory.mktemp("data") / "d"
    return prepare_corpus(
        corpus_file, data_dir, "data.val_ratio=0.1", "data.test_ratio=0.1", "tokenizer.vocab_size=512"
    )


@pytest.fixture(scope="session")
def tokenizer(prepared_dir) -> Tokenizer:
    return load_tokenizer(prepared_dir)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, prepared_dir) -> Path:
    from sllm.train.trainer import train

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    steps = [
        "train.max_steps=120",
        "train.checkpoint_interval=30",
        "train.eval_interval=40",
        "train.log_interval=1",
    ]
    train(tiny_config(prepared_dir, run_dir, *steps), log=lambda _: None)
    return run_dir


def random_run(run_dir: Path, tokenizer: Tokenizer, *overrides: str, seed: int = 0) -> Path:
    """A run directory holding a randomly initialized model: config, tokenizer, one checkpoint."""
    from dataclasses import asdict

    from sllm.config import save_config
    from sllm.model import build_model
    from sllm.run import CONFIG_FILE, CheckpointMeta
    from sllm.train.checkpoint import save_checkpoint

    cfg = tiny_config(
        run_dir.parent / "no-data", run_dir, f"model.vocab_size={tokenizer.vocab_size}", *overrides
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    tokenizer.save(run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    meta = CheckpointMeta(step=7, tokens_seen=1792, val_loss=5.5, model_config=asdict(cfg.model))
    save_checkpoint(run_dir, model.state_dict(), {}, meta, keep_last=1)
    return run_dir


def pytest_collection_modifyitems(config, items) -> None:
    """`@pytest.mark.gpu` tests skip, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_cuda)
