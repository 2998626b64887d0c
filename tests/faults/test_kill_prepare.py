"""`sllm prepare` killed at random moments never leaves output that looks complete, and a
rerun produces exactly what an uninterrupted prepare produces."""

from __future__ import annotations

import filecmp
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sllm.tokenizer import train_bpe

from ..conftest import constitution_paragraphs

OUTPUT_FILES = ("meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin", "test-00000.bin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """About 6 MB of distinct documents and a tokenizer trained beforehand."""
    root = tmp_path_factory.mktemp("big")
    lines = constitution_paragraphs()
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for copy in range(150):
            for number, line in enumerate(lines):
                handle.write(json.dumps({"text": f"{copy}-{number} {line}"}, ensure_ascii=False) + "\n")
    train_bpe(iter(lines), 1000, ["<|endoftext|>", "<|pad|>"]).save(root / "tok")
    return root / "corpus.jsonl", root / "tok"


def _command(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sllm", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(out), "--val-ratio", "0.05", "--test-ratio", "0.05"]  # fmt: skip


def _assert_identical(a: Path, b: Path) -> None:
    for name in OUTPUT_FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_killed_prepare_reruns_to_identical_output(tmp_path, corpus):
    straight = tmp_path / "straight"
    started = time.perf_counter()
    subprocess.run(_command(*corpus, straight), check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - started

    out = tmp_path / "killed"
    rng = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen(_command(*corpus, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, duration))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        if (out / "meta.json").exists():  # it finished first: the output must be the whole thing
            _assert_identical(out, straight)
        else:
            assert not out.exists()

    subprocess.run(_command(*corpus, out), check=True, capture_output=True, timeout=300)
    _assert_identical(out, straight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "straight"]  # no temp dirs left
