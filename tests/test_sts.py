"""STS fine-tuning: loaders on the real files, scores equal scipy's, the head learns, CLI end to end."""

import contextlib
import io
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from sllm.cli import main
from sllm.config import Config, LogConfig
from sllm.errors import UserError
from sllm.finetune.metrics import sts_scores
from sllm.finetune.sts import (
    EncodedPairs,
    StsConfig,
    build_optimizer,
    build_sts_model,
    fit,
    masked_mean,
    pad_batch,
    score,
    sts_config,
)
from sllm.finetune.sts_data import load_sts
from sllm.run import open_run

from .conftest import SHARED_DATA, constitution_paragraphs
from .test_cli import assert_one_line_error


def sllm(*args):
    """The CLI in this process (the subprocess path is covered by test_cli): exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


TSV_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"


@pytest.mark.parametrize(
    ("name", "rows", "kind"),
    [
        ("korsts/sts-train.tsv", 5749, "KorSTS TSV"),
        ("korsts/sts-dev.tsv", 1500, "KorSTS TSV"),
        ("korsts/sts-test.tsv", 1379, "KorSTS TSV"),
        ("klue_sts/klue-sts-v1.1_dev.json", 519, "KLUE-STS JSON"),
    ],
)
def test_loaders_read_every_row_of_the_real_files(name, rows, kind):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    data = load_sts(path)
    assert (len(data.pairs), data.skipped, data.format) == (rows, [], kind)
    assert all(0 <= p.score <= 5 and p.sentence1 and p.sentence2 for p in data.pairs)


def test_korsts_dev_keeps_quotes_and_the_unterminated_last_row():
    path = SHARED_DATA / "korsts" / "sts-dev.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    raw_last = path.read_text(encoding="utf-8").split("\n")[-1].split("\t")
    pairs = load_sts(path).pairs
    assert (pairs[-1].sentence1, pairs[-1].sentence2, pairs[-1].score) == (
        raw_last[5],
        raw_last[6],
        float(raw_last[4]),
    )
    assert any('"' in p.sentence1 + p.sentence2 for p in pairs)


def test_tsv_rows_without_a_usable_score_are_skipped_and_reported(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text(
        TSV_HEADER
        + 'a\tb\t2012\t1\t4.5\t그는 "안녕"이라고 말했다.\t그가 인사했다.\n'
        + "a\tb\t2012\t2\t\t빈 점수\t문장\n"
        + "a\tb\t2012\t3\tabc\t글자 점수\t문장\n"
        + "a\tb\t2012\t4\t7.5\t범위 밖\t문장\n"
        + "a\tb\t2012\t5\t0.25\t마지막 줄\t줄바꿈 없음",  # no final newline, as in KorSTS dev
        encoding="utf-8",
    )
    data = load_sts(path)
    assert [(p.sentence1, p.score) for p in data.pairs] == [
        ('그는 "안녕"이라고 말했다.', 4.5),
        ("마지막 줄", 0.25),
    ]
    assert len(data.skipped) == 3
    assert "skipped 3 rows" in data.summary() and "line 3 score ''" in data.summary()


def test_klue_json_with_crlf_is_read_and_a_missing_label_reported(tmp_path):
    records = [
        {"sentence1": "가", "sentence2": "나", "labels": {"label": 3.2}},
        {"sentence1": "다", "sentence2": "라", "labels": {}},
        {"sentence1": "마", "sentence2": "바", "labels": {"label": 0}},
    ]
    path = tmp_path / "klue.json"
    path.write_bytes(json.dumps(records, ensure_ascii=False, indent=2).replace("\n", "\r\n").encode())
    data = load_sts(path)
    assert [p.score for p in data.pairs] == [3.2, 0.0]
    assert data.skipped == ["record 1 score None"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        ("a\tb\tc\n1\t2\t3\n", "missing score, sentence1, sentence2"),
        (TSV_HEADER + "a\tb\t2012\t1\t4.0\tonly six fields\n", "line 2 has 6 tab-separated fields"),
        ('[{"sentence1": "a", "sentence2": "b", "labels": {"label": 1}},', "not valid JSON"),
        ('[{"sentence1": "a", "labels": {"label": 1}}]', "record 0 lacks"),
        (TSV_HEADER + "a\tb\t2012\t1\tx\ts\tt\n", "fewer than 2 pairs"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=fragment):
        load_sts(path)


def test_scores_equal_scipy_on_fixed_vectors():
    predicted = [0.1, 2.5, 2.4, 4.9, 3.3, 1.0, 0.7]
    gold = [0.0, 3.0, 2.0, 5.0, 2.8, 1.5, 1.5]
    scores = sts_scores(predicted, gold)
    assert scores.spearman == pytest.approx(100 * stats.spearmanr(predicted, gold).statistic, abs=1e-9)
    assert scores.pearson == pytest.approx(100 * stats.pearsonr(predicted, gold).statistic, abs=1e-9)
    ranks_predicted, ranks_gold = [1, 5, 4, 7, 6, 3, 2], [1, 6, 4, 7, 5, 2.5, 2.5]  # ties share the mean rank
    assert scores.spearman == pytest.approx(100 * np.corrcoef(ranks_predicted, ranks_gold)[0, 1])
    assert scores.n == 7


def test_padding_does_not_change_a_sentence_embedding(trained_run):
    model = open_run(trained_run, torch.device("cpu")).model
    sentence = [5, 17, 42, 8, 99]
    ids, mask = pad_batch([sentence, [*sentence, 1, 2, 3]], pad_id=0)
    mask[1, len(sentence) :] = False  # the same sentence, then three masked tokens
    pooled = masked_mean(model.hidden_states(ids), mask)
    assert ids.shape == (2, 8) and mask[0].tolist() == [True] * 5 + [False] * 3
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6)


class BagOfTokens(nn.Module):
    """A stand-in backbone: each token's hidden state is its (random, fixed) embedding."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(n_embd=width)
        self.wte = nn.Embedding(vocab_size, width)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)


def synthetic_pairs(count: int, seed: int, vocab_size: int = 1000) -> EncodedPairs:
    """Sentence 2 is sentence 1 (6 to 10 tokens) with k tokens replaced; gold is 5 · (1 − k/length)."""
    rng = random.Random(seed)
    first, second, scores = [], [], []
    for _ in range(count):
        length = rng.randint(6, 10)
        sentence = [rng.randrange(1, vocab_size) for _ in range(length)]
        replaced = rng.randrange(length + 1)
        other = list(sentence)
        for position in rng.sample(range(length), replaced):
            other[position] = rng.randrange(1, vocab_size)
        first.append(sentence)
        second.append(other)
        scores.append(5.0 * (1 - replaced / length))
    return EncodedPairs(first, second, torch.tensor(scores), pad_id=0)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fit(model, train, dev, cfg, run_dir, tokenizer):
    quiet_base = Config(log=LogConfig(progress=False, tensorboard=False))
    return fit(model, train, dev, cfg, run_dir, quiet_base, tokenizer, log=lambda _: None)


def test_head_learns_a_synthetic_similarity_task(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = StsConfig(
        epochs=12, batch_size=32, lr=3e-3, freeze=True, head_hidden=64, head_dropout=0.0, device="cpu"
    )
    model = build_sts_model(BagOfTokens(1000, 128), cfg)
    backbone_before = model.backbone.wte.weight.clone()
    train, dev = synthetic_pairs(800, seed=1), synthetic_pairs(200, seed=2)
    untrained = score(model, dev, device=torch.device("cpu"))
    best = _fit(model, train, dev, cfg, tmp_path / "sts", tokenizer)
    records = _records(tmp_path / "sts")
    evaluations = [r for r in records if "spearman" in r]
    assert len(evaluations) == 12 and evaluations[-1]["spearman"] > 90 > untrained.spearman
    assert best.dev.spearman == max(e["spearman"] for e in evaluations)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert torch.equal(model.backbone.wte.weight, backbone_before)  # frozen means frozen


def test_finetuning_trains_the_backbone_at_its_own_learning_rate(tmp_path, trained_run):
    base = open_run(trained_run, torch.device("cpu"))
    cfg = StsConfig(epochs=1, batch_size=16, lr=1e-3, backbone_lr=1e-5, warmup_ratio=0.0, device="cpu")
    model = build_sts_model(base.model, cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    data = synthetic_pairs(32, seed=3, vocab_size=base.tokenizer.vocab_size)
    data.pad_id = base.tokenizer.pad_id
    _fit(model, data, data, cfg, tmp_path / "sts", base.tokenizer)
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert "wte.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    groups = build_optimizer(model, cfg).param_groups
    head_ids = {id(p) for p in model.head.parameters()}
    for group in groups:
        expected = 1e-3 if all(id(p) in head_ids for p in group["params"]) else 1e-5
        assert group["lr"] == expected
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_sts_overrides_are_checked():
    assert sts_config(["sts.epochs=2", "sts.freeze=true"]) == StsConfig(epochs=2, freeze=True)
    for overrides, fragment in [
        (["sts.epoch=2"], "unknown config key sts.epoch"),
        (["sts.lr=fast"], "sts.lr must be of type float"),
        (["sts.epochs=0"], "sts.epochs must be positive"),
        (["sts.head_dropout=1"], "sts.head_dropout must be in [0, 1)"),
        (["train.lr=1e-3"], "must use the section sts"),
    ]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            sts_config(overrides)


def write_sts_tsv(path: Path, count: int, seed: int) -> Path:
    """Constitution sentences paired with themselves (score 5), a prefix (2.5) or another (0)."""
    rng = random.Random(seed)
    sentences = [s[:60] for s in constitution_paragraphs() if len(s) > 20]
    rows = []
    for number in range(count):
        first, other = rng.sample(sentences, 2)
        second, gold = [(first, 5.0), (first[: len(first) // 2], 2.5), (other, 0.0)][number % 3]
        rows.append(f"g\tf\t2024\t{number}\t{gold:.3f}\t{first}\t{second}")
    path.write_text(TSV_HEADER + "\n".join(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("freeze", ["true", "false"])
def test_finetune_then_eval_sts_through_the_cli(tmp_path, trained_run, freeze):
    train = write_sts_tsv(tmp_path / "train.tsv", 60, seed=1)
    dev = write_sts_tsv(tmp_path / "dev.tsv", 30, seed=2)
    out = tmp_path / "sts"
    result = sllm("finetune", "sts", "--run", trained_run, "--train", train, "--dev", dev, "--out", out,
                  "sts.epochs=2", "sts.batch_size=16", "sts.max_length=32", "sts.device=cpu",
                  f"sts.freeze={freeze}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "best dev spearman" in result.stdout
    epochs = [r for r in _records(out) if "spearman" in r]  # the dev set is scored after each epoch
    assert [e["epoch"] for e in epochs] == [1, 2]
    best = max(epochs, key=lambda e: e["spearman"])
    for name in ("config.yaml", "sts.yaml", "tokenizer.json", "checkpoints/best/model.safetensors"):
        assert (out / name).is_file(), name

    result = sllm("eval", "sts", "--run", out, "--data", dev, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    n, spearman, pearson = result.stdout.strip().splitlines()[-1].split()
    assert int(n) == 30
    assert float(spearman) == pytest.approx(best["spearman"], abs=0.01)
    assert float(pearson) == pytest.approx(best["pearson"], abs=0.01)

    again = sllm("finetune", "sts", "--run", trained_run, "--train", train, "--dev", dev, "--out", out)
    assert_one_line_error(again, "already holds checkpoints of a fine-tuning with other settings")
    for command in (
        ("eval", "--device", "cpu"),
        ("generate", "--prompt", "x"),
        ("export", "--out", tmp_path / "hf"),
    ):
        assert_one_line_error(sllm(*command, "--run", out), "is an STS run", "sllm eval sts")


def test_bad_sts_input_gives_one_line_and_exit_2(tmp_path, trained_run):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tscore\nhello\t1\n", encoding="utf-8")
    good = write_sts_tsv(tmp_path / "good.tsv", 6, seed=1)
    common = ["--run", trained_run, "--dev", good, "--out", tmp_path / "out"]
    assert_one_line_error(sllm("finetune", "sts", "--train", bad, *common), "bad.tsv", "sentence1")
    assert_one_line_error(sllm("finetune", "sts", "--train", good, *common, "sts.epochs=-1"), "sts.epochs")
    assert_one_line_error(sllm("eval", "sts", "--run", trained_run, "--data", good), "not an STS run")
    assert_one_line_error(sllm("eval", "sts", "--run", trained_run), "needs --data")
    assert_one_line_error(sllm("eval", "--run", trained_run, "--data", good), "add `sts`")
