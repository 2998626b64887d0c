import math
import os
import shutil
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.data.loader import strided_spans
from sllm.errors import UserError
from sllm.evaluate import evaluate_run, evaluate_texts, score_tokens, unigram_perplexity
from sllm.model import build_model
from sllm.run import open_run
from sllm.tokenizer import CharTokenizer

from .conftest import constitution_paragraphs, random_run
from .test_cli import assert_one_line_error, sllm


def _brute_force_scores(model, tokens, context_start):
    """Score each target p with an explicit context tokens[context_start(p):p], one at a time:
    (summed NLL, top-1 hits, top-5 hits)."""
    total, top1, top5 = 0.0, 0, 0
    for p in range(1, len(tokens)):
        context = torch.tensor(tokens[context_start(p) : p])[None]
        logits = model(context)[0, -1]
        total -= F.log_softmax(logits.double(), dim=-1)[tokens[p]].item()
        ranked = sorted(range(len(logits)), key=lambda t: -logits[t].item())
        top1 += ranked[0] == tokens[p]
        top5 += tokens[p] in ranked[:5]
    return total, top1, top5


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_strided_perplexity_equals_brute_force(stride):
    torch.manual_seed(0)
    block = 16
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=block)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=75).astype(np.uint16)
    spans = list(strided_spans(len(tokens), block, stride))
    window_of = {}
    for span in spans:
        for target in range(span.end - span.scored + 1, span.end + 1):
            window_of[target] = span.begin

    with torch.no_grad():
        scores = score_tokens(model, tokens, stride, batch_size=4, device=torch.device("cpu"))
        nll, top1, top5 = _brute_force_scores(model, tokens.tolist(), lambda p: window_of[p])
    assert scores.tokens == len(tokens) - 1
    assert scores.nll == pytest.approx(nll, rel=1e-5)
    assert (scores.top1, scores.top5) == (top1, top5)
    assert 0 < top1 < top5
    if stride == 1:  # every target sees the full preceding block
        assert all(window_of[p] == max(0, p - block) for p in range(1, len(tokens)))


def test_every_target_is_scored_exactly_once():
    for n in (2, 17, 100):
        for block, stride in ((16, 16), (16, 3), (8, 1)):
            targets = []
            for span in strided_spans(n, block, stride):
                assert span.end - span.begin <= block
                targets.extend(range(span.end - span.scored + 1, span.end + 1))
            assert targets == list(range(1, n))


def test_eval_run_reports_loss_perplexity_and_bits_per_byte(trained_run, prepared_dir):
    results = {r.split: r for r in evaluate_run(trained_run, device="cpu")}
    assert set(results) == {"val", "test"}
    val = results["val"]
    assert val.perplexity == pytest.approx(math.exp(val.loss))
    import json

    meta = json.loads((prepared_dir / "meta.json").read_text())
    assert val.tokens == meta["splits"]["val"]["tokens"] - 1
    assert val.bits_per_byte == pytest.approx(
        val.loss * val.tokens / math.log(2) / meta["splits"]["val"]["bytes"]
    )
    assert val.perplexity < 512


def test_unigram_baseline_matches_hand_computation():
    train = np.array([0, 0, 1, 2])
    val = np.array([9, 0, 1])  # first token is context only
    probabilities = (np.array([2, 1, 1]) + 1) / 7
    expected = math.exp(-(math.log(probabilities[0]) + math.log(probabilities[1])) / 2)
    assert unigram_perplexity(train, val, 3) == pytest.approx(expected)


def test_text_file_eval_matches_a_hand_computation(tokenizer, tmp_path):
    text = "대한민국은 민주공화국이다. 주권은 국민에게 있다."
    path = tmp_path / "ko.txt"
    path.write_text(unicodedata.normalize("NFD", text), encoding="utf-8")  # decomposed Hangul
    run_dir = random_run(tmp_path / "run", tokenizer)
    (result,) = evaluate_texts(run_dir, [path], device="cpu")

    model = open_run(run_dir, torch.device("cpu")).model
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]  # the EOS is context: every text token counts
    assert len(ids) <= model.block_size + 1
    with torch.no_grad():
        nll = float(
            F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="sum")
        )
    assert (result.split, result.tokens, result.bytes) == (str(path), len(ids) - 1, len(text.encode("utf-8")))
    assert result.loss == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_text_eval_scores_files_longer_than_the_context(trained_run, tmp_path):
    path = tmp_path / "constitution.txt"
    path.write_text("\n".join(constitution_paragraphs()[:20]), encoding="utf-8")
    (result,) = evaluate_texts(trained_run, [path], stride=8, device="cpu")
    assert result.tokens > 10 * 32
    assert result.perplexity < 512  # better than uniform over the vocabulary: it learned this text
    printed = sllm("eval", "--run", trained_run, "--text", path, "--stride", 8, "--device", "cpu")
    assert printed.returncode == 0, printed.stderr
    assert f"{result.tokens:>10,} {result.loss:>8.4f}" in printed.stdout


def test_text_eval_refuses_missing_and_non_utf8_files_and_bad_strides(trained_run, tmp_path):
    (tmp_path / "ko.txt").write_text("대한민국", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        evaluate_texts(trained_run, [latin1], device="cpu")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\x00\x01\x02")
    with pytest.raises(UserError, match="looks like a binary file"):
        evaluate_texts(trained_run, [binary], device="cpu")
    with pytest.raises(UserError, match="--stride must be between 1 and the context"):
        evaluate_texts(trained_run, [tmp_path / "ko.txt"], stride=-1, device="cpu")
    assert_one_line_error(sllm("eval", "--run", trained_run, "--text", tmp_path / "no.txt"), "not found")


def test_python_evaluator_gives_the_cli_numbers(trained_run):
    from sllm import Evaluator

    from .test_cli import sllm

    result = Evaluator.from_run(trained_run, device="cpu").evaluate(split="val")
    row = sllm("eval", "--run", trained_run, "--split", "val").stdout.splitlines()[1].split()
    assert row[0] == "val" and int(row[1].replace(",", "")) == result.tokens
    assert float(row[2]) == pytest.approx(result.loss, abs=1e-4)
    assert float(row[4]) == pytest.approx(result.bits_per_byte, abs=1e-4)
    assert row[5] == f"{result.scores.accuracy:.1%}"
    assert set(result.as_dict()) >= {"loss", "perplexity", "bits_per_byte", "accuracy", "top5_accuracy"}


def _run_with_relative_data(workdir, prepared_dir, tokenizer):
    """A run in `workdir` whose config says data.dir=data, as `sllm train --data data` writes it."""
    shutil.copytree(prepared_dir, workdir / "data")
    return random_run(workdir / "run", tokenizer, "data.dir=data")


def test_eval_from_another_directory_scores_the_data_given_with_the_same_numbers(
    tmp_path, prepared_dir, tokenizer
):
    run = _run_with_relative_data(tmp_path / "work", prepared_dir, tokenizer)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    at_home = sllm("eval", "--run", "run", "--device", "cpu", cwd=tmp_path / "work")
    away = sllm("eval", "--run", run, "--data", tmp_path / "work" / "data", "--device", "cpu", cwd=elsewhere)
    assert at_home.returncode == away.returncode == 0, away.stderr
    assert [line.split()[0] for line in at_home.stdout.splitlines()] == ["split", "val", "test"]
    assert away.stdout == at_home.stdout


def test_a_runs_relative_data_dir_missing_here_names_both_fixes(tmp_path, prepared_dir, tokenizer):
    run = _run_with_relative_data(tmp_path / "work", prepared_dir, tokenizer)
    result = sllm("eval", "--run", run, "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(
        result,
        f"the run's data.dir data (relative to the current directory {os.path.realpath(tmp_path)})",
        "run from the directory the run was trained in, or pass --data DIR",
    )


def test_eval_data_prepared_with_another_tokenizer_is_refused(tmp_path, prepared_dir):
    chars = random_run(tmp_path / "chars", CharTokenizer(["<|endoftext|>"], list("가나다")))
    result = sllm("eval", "--run", chars, "--data", prepared_dir, "--device", "cpu")
    assert_one_line_error(result, f"the data in {prepared_dir} was prepared with another tokenizer")
