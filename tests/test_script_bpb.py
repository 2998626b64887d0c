"""Bits per byte per script (Korean, English, other) in `sllm eval` and training's validation."""

import argparse
import json
import math
import unittest

import numpy as np
import pytest

from sllm.cli import main
from sllm.data.prepare import prepare
from sllm.evaluate import SCRIPT_GROUPS, evaluate_run, script_labels
from sllm.tokenizer import train_bpe
from sllm.train.trainer import train

from .conftest import constitution_paragraphs, tiny_config, write_jsonl

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def english_paragraphs() -> list[str]:
    """Real English prose: paragraphs of standard-library docstrings."""
    text = "\n\n".join([argparse.__doc__, unittest.__doc__, json.__doc__, math.__doc__])
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 3]


def test_each_document_goes_to_its_script_with_its_eos_and_bytes_a_lone_eos_to_the_next():
    korean, english = "대한민국은 민주공화국이다.", "the cat sat on the mat."
    tokenizer = train_bpe(iter([korean, english] * 10), 300, SPECIALS)
    ko, en, other = (tokenizer.encode(t) for t in (korean, english, "12345"))
    eos = tokenizer.eos_id
    tokens = np.array([eos, *ko, eos, *en, eos, *other, eos, *ko[:2]])  # a window opening on an EOS
    labels, script_bytes = script_labels(tokens, tokenizer)
    expected = [0] * (len(ko) + 2) + [1] * (len(en) + 1) + [2] * (len(other) + 1) + [0, 0]
    assert labels.tolist() == expected
    head = len(tokenizer.decode(ko[:2]).encode())
    assert script_bytes.tolist() == [len(korean.encode()) + head, len(english.encode()), 5]


@pytest.fixture(scope="module")
def bilingual_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bilingual")
    documents = [
        text
        for pair in zip(constitution_paragraphs()[:40], english_paragraphs() * 2, strict=False)
        for text in pair
    ]
    corpus = write_jsonl(root / "corpus.jsonl", documents)
    cfg = tiny_config(
        root / "data", root / "run", f"data.inputs={json.dumps([str(corpus)])}", "data.val_ratio=0.3",
        "tokenizer.vocab_size=400", "train.max_steps=10", "train.eval_interval=5",
    )  # fmt: skip
    prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    train(cfg, log=lambda _: None)
    return root


@pytest.fixture(scope="module")
def val(bilingual_run):
    return evaluate_run(bilingual_run / "run", ["val"], stride=32, device="cpu")[0]


def test_bits_per_byte_by_script_add_up_to_the_total(bilingual_run, val):
    meta = json.loads((bilingual_run / "data" / "meta.json").read_text())
    by_script = val.scores.script_bits_per_byte(val.script_bytes)
    assert set(by_script) == {"ko", "en"}
    assert int(val.script_bytes.sum()) == val.bytes == meta["splits"]["val"]["bytes"]
    weighted = sum(by_script[g] * val.script_bytes[SCRIPT_GROUPS.index(g)] for g in by_script)
    assert weighted == pytest.approx(val.bits_per_byte * val.bytes, rel=1e-5)
    assert sum(val.scores.script_nll) == pytest.approx(val.scores.nll, rel=1e-5)
    assert val.as_dict()["bits_per_byte_ko"] == by_script["ko"]


def test_training_validation_logs_bits_per_byte_by_script(bilingual_run):
    rows = [json.loads(line) for line in (bilingual_run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_bits_per_byte" in row]
    assert len(evals) == 2
    for row in evals:  # the total is the byte-weighted mean of the scripts: between them
        scripts = [row[f"val_bits_per_byte_{g}"] for g in SCRIPT_GROUPS if f"val_bits_per_byte_{g}" in row]
        assert {"val_bits_per_byte_ko", "val_bits_per_byte_en"} <= set(row)
        assert min(scripts) < row["val_bits_per_byte"] < max(scripts)


def test_eval_prints_bits_per_byte_by_script(bilingual_run, val, capsys):
    main(["eval", "--run", str(bilingual_run / "run"), "--split", "val", "--stride", "32", "--device", "cpu"])
    by_script = val.scores.script_bits_per_byte(val.script_bytes)
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-6:] == ["bpb", "ko", "bpb", "en", "bpb", "other"]
    expected = [f"{by_script[g]:.4f}" if g in by_script else "-" for g in SCRIPT_GROUPS]
    assert row.split()[-3:] == expected
