"""Prepare at scale: shards, resume after an interruption, held-out files, several sources
with their own fields, mixture weights applied by the training sampler, tokenizer sample."""

import filecmp
import json
import subprocess
import sys

import numpy as np
import pytest

from sllm.config import load_config
from sllm.data import prepare as prepare_module
from sllm.data.inspect import describe_data
from sllm.data.loader import TrainWindows, eval_batches
from sllm.data.mixture import TrainMixture
from sllm.data.prepare import Progress, _interleaved_sample, prepare, work_path
from sllm.data.shards import TokenShards
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.tokenizer import load_tokenizer
from sllm.train.trainer import train

from .conftest import constitution_paragraphs, tiny_config, write_jsonl


def _config(out, *overrides):
    return load_config(None, [f"data.dir={out}", "tokenizer.vocab_size=400", *overrides])


def _inputs(*paths) -> str:
    return f"data.inputs={json.dumps([str(p) for p in paths])}"


def _prepare(cfg, messages=None):
    return prepare(cfg.data, cfg.tokenizer, log=(messages.append if messages is not None else lambda _: None))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Distinct documents, with some exact duplicates so that dedup has work to do."""
    lines = constitution_paragraphs()
    texts = [f"{copy}-{number} {line}" for copy in range(3) for number, line in enumerate(lines)]
    texts += texts[:40]
    return write_jsonl(tmp_path_factory.mktemp("scale") / "corpus.jsonl", texts)


def test_shards_read_back_equal_to_a_single_file_prepare(tmp_path, corpus):
    overrides = [_inputs(corpus), "data.val_ratio=0.1", "data.test_ratio=0.1"]
    single = _prepare(_config(tmp_path / "single", *overrides))
    sharded = _prepare(_config(tmp_path / "sharded", *overrides, "data.shard_tokens=1000"))
    assert single.splits == sharded.splits and len(single.shards["train"]) == 1
    names = sharded.shards["train"]
    assert len(names) == -(-sharded.splits["train"].tokens // 1000) > 10
    sizes = [(tmp_path / "sharded" / name).stat().st_size for name in names]
    assert set(sizes[:-1]) == {2000} and 0 < sizes[-1] <= 2000
    for split in ("train", "val", "test"):
        whole = open_split(tmp_path / "single", split, single)
        shards = open_split(tmp_path / "sharded", split, sharded)
        assert isinstance(shards, TokenShards) and len(shards) == len(whole)
        assert np.array_equal(np.asarray(shards), whole)
        for a, b in zip(eval_batches(whole, 64, 32, 8), eval_batches(shards, 64, 32, 8), strict=True):
            assert a.inputs.equal(b.inputs) and a.targets.equal(b.targets) and a.scored.equal(b.scored)
    plain = TrainWindows(open_split(tmp_path / "single", "train", single), 64, 8, seed=3)
    split_up = TrainWindows(open_split(tmp_path / "sharded", "train", sharded), 64, 8, seed=3)
    for step in range(20):
        assert all(a.equal(b) for a, b in zip(plain.batch(step, 0), split_up.batch(step, 0), strict=True))


def test_token_shards_slice_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, size=n).astype(np.uint16) for n in (7, 1, 0, 30, 5)]
    whole = np.concatenate(parts)
    shards = TokenShards(parts)
    for begin, end in [(0, len(whole)), (5, 9), (6, 8), (7, 8), (8, 40), (40, 43), (3, 3), (0, 100)]:
        assert np.array_equal(shards[begin:end], whole[begin:end])
    assert np.array_equal(shards[10:], whole[10:])


def test_interrupted_prepare_resumes_to_identical_bytes(tmp_path, corpus, monkeypatch):
    """Also across encode groups of other sizes: one batch per group straight, several when resumed."""
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_DOCS", 16)
    monkeypatch.setattr(prepare_module, "ENCODE_GROUP_CHARS", 1)
    overrides = [_inputs(corpus), "data.val_ratio=0.1", "data.test_ratio=0.1", "data.dedup=true",
                 "data.shard_tokens=500"]  # fmt: skip
    straight = _prepare(_config(tmp_path / "straight", *overrides))
    assert straight.cleaning.dropped["duplicate"] == 40

    out = tmp_path / "resumed"
    real_write = prepare_module.SplitWriter.write
    calls = {"n": 0}

    def crash_after_some_batches(self, group):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_write(self, group)

    monkeypatch.setattr(prepare_module.SplitWriter, "write", crash_after_some_batches)
    with pytest.raises(KeyboardInterrupt):
        _prepare(_config(out, *overrides))
    saved = json.loads((work_path(out) / "progress.json").read_text())
    assert 0 < saved["batches_done"] <= 39 and not out.exists()
    open_shard = max(work_path(out).glob("train-*.bin"))
    open_shard.open("ab").write(b"tokens written after the last saved progress")

    monkeypatch.setattr(prepare_module.SplitWriter, "write", real_write)
    monkeypatch.setattr(prepare_module, "ENCODE_GROUP_CHARS", 3000)
    messages: list[str] = []
    resumed = _prepare(_config(out, *overrides), messages)
    assert messages[0].startswith(f"resuming the interrupted prepare after {saved['batches_done'] * 16:,}")
    assert resumed == straight
    names = ["meta.json", "tokenizer.json", *(n for split in straight.shards.values() for n in split)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all(filecmp.cmp(out / n, tmp_path / "straight" / n, shallow=False) for n in names)
    assert not work_path(out).exists()


def test_progress_of_other_inputs_is_not_resumed(tmp_path, corpus):
    work = work_path(tmp_path / "out")
    work.mkdir()
    Progress({"format_version": 0}, batches_done=3).save(work)
    messages: list[str] = []
    meta = _prepare(_config(tmp_path / "out", _inputs(corpus)), messages)
    assert not any("resuming" in m for m in messages)
    assert meta == _prepare(_config(tmp_path / "fresh", _inputs(corpus)))


def test_held_out_files_fill_val_and_test(tmp_path):
    paragraphs = constitution_paragraphs()
    train = write_jsonl(tmp_path / "train.jsonl", paragraphs[:100])
    val = write_jsonl(tmp_path / "val.jsonl", paragraphs[100:120])
    test = write_jsonl(tmp_path / "test.jsonl", paragraphs[120:125])
    meta = _prepare(
        _config(tmp_path / "out", _inputs(train), f"data.val_inputs=[{val}]", f"data.test_inputs=[{test}]")
    )
    assert [meta.splits[s].documents for s in ("train", "val", "test")] == [100, 20, 5]
    tok = load_tokenizer(tmp_path / "out")
    val_tokens = np.asarray(open_split(tmp_path / "out", "val", meta)).tolist()
    assert val_tokens == [t for p in paragraphs[100:120] for t in [*tok.encode(p), tok.eos_id]]


def test_sources_with_their_own_fields_and_weights_drive_the_sampler(tmp_path):
    korean = tmp_path / "ko.jsonl"
    korean.write_text("".join(json.dumps({"review": p}, ensure_ascii=False) + "\n"
                              for p in constitution_paragraphs()), "utf-8")  # fmt: skip
    english = write_jsonl(
        tmp_path / "en.jsonl", [f"Article {i}: the people elect the assembly." for i in range(60)]
    )
    sources = json.dumps([
        {"name": "ko", "inputs": [str(korean)], "text_field": "review", "weight": 0.3},
        {"name": "en", "inputs": [str(english)], "weight": 0.7},
    ])  # fmt: skip
    meta = _prepare(_config(tmp_path / "out", f"data.sources={sources}", "data.val_ratio=0"))
    ko, en = meta.sources
    assert ko.name == "ko" and ko.splits["train"].documents == len(constitution_paragraphs())
    assert en.splits["train"].documents == 60
    assert ko.train_range == (0, ko.splits["train"].tokens)
    assert en.train_range[1] == meta.splits["train"].tokens
    assert ko.natural_share > 0.8 and ko.sampling_share == pytest.approx(0.3)

    windows = TrainWindows(
        open_split(tmp_path / "out", "train", meta), 16, 64, 0, TrainMixture.from_meta(meta)
    )
    starts = np.concatenate([windows.starts(step, 0) for step in range(300)])
    english_tokens = en.train_range[1] - en.train_range[0]
    assert meta.splits["train"].tokens > 2 * english_tokens
    with pytest.raises(
        UserError, match=f"a weighted source has fewer than {english_tokens + 1} training tokens"
    ):
        TrainWindows(
            open_split(tmp_path / "out", "train", meta), english_tokens, 4, 0, TrainMixture.from_meta(meta)
        )
    from_english = (starts >= en.train_range[0]).mean()
    assert abs(from_english - 0.7) < 0.02
    assert (starts + 17 <= np.where(starts >= en.train_range[0], en.train_range[1], ko.train_range[1])).all()


def test_input_weights_make_one_source_per_input(tmp_path, corpus):
    english = write_jsonl(tmp_path / "en.jsonl", [f"Sentence number {i} in English." for i in range(50)])
    meta = _prepare(_config(tmp_path / "out", _inputs(corpus, english), "data.input_weights=[0.5, 0.5]"))
    assert [s.name for s in meta.sources] == [str(corpus), str(english)]
    assert [s.sampling_share for s in meta.sources] == [0.5, 0.5]
    described = describe_data(tmp_path / "out")
    assert f"source {english}: 50 documents" in described and "sampled 50.0%" in described
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "out", run, "train.max_steps=4", "train.eval_interval=2")
    train(cfg, log=lambda _: None)
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000004"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.input_weights=[1.0]"], "1 source weights for 2 inputs"),
        (['data.sources=[{"inputs": ["X"], "weight": 1}]'], "weight all of them or none"),
        (['data.sources=[{"inputs": ["X"], "colour": 1}]'], "unknown config key data.sources\\[0\\].colour"),
        (['data.sources=[{"name": "inputs", "inputs": ["X"]}]'], "source names must be unique"),
    ],
)
def test_inconsistent_sources_are_user_errors(tmp_path, corpus, overrides, message):
    overrides = [o.replace('"X"', json.dumps(str(corpus))) for o in overrides]
    with pytest.raises(UserError, match=message):
        _prepare(_config(tmp_path / "out", _inputs(corpus, corpus), *overrides))


def test_tokenizer_is_trained_on_the_sample_only(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", ["가나다라"] * 5)
    second = write_jsonl(tmp_path / "b.jsonl", ["abcd", "wxyz", "qqqq"])
    cfg = _config(tmp_path / "out", _inputs(first), f"data.sources=[{{inputs: [{second}]}}]",
                  "tokenizer.kind=char", "tokenizer.sample_bytes=20", "data.val_ratio=0")  # fmt: skip
    _prepare(cfg)
    tok = load_tokenizer(tmp_path / "out")
    assert tok.token_id("가") is not None and tok.token_id("a") is not None  # round-robin: both sources
    assert tok.token_id("w") is None  # the second English document lies past the 20-byte sample
    assert list(_interleaved_sample([iter(["aa", "bb"]), iter(["c"])], 10)) == ["aa", "c", "bb"]


def test_prepare_cli_takes_weights_and_held_out_files(tmp_path, corpus):
    val = write_jsonl(tmp_path / "val.jsonl", constitution_paragraphs()[:10])
    english = write_jsonl(tmp_path / "en.jsonl", [f"Line {i} of English text." for i in range(80)])
    command = [sys.executable, "-m", "sllm", "prepare", "--input", str(corpus), "--input", str(english),
               "--source-weight", "0.6", "--source-weight", "0.4", "--val-input", str(val),
               "--out", str(tmp_path / "out"), "--shard-tokens", "5000",
               "tokenizer.vocab_size=300"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sampled 60.0%" in done.stdout and "sampled 40.0%" in done.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 10 and len(meta["shards"]["train"]) > 1

    bad = subprocess.run([*command, "--source-weight", "0.1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "3 source weights for 2 inputs" in bad.stderr


def test_the_fast_encoder_prepares_the_bytes_tokenizers_does(tmp_path, monkeypatch):
    """Short documents from two sources, a held-out file, special tokens, decomposed Hangul, a lone
    surrogate: the joined `tiktoken` path writes exactly what `tokenizers` alone writes."""
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_DOCS", 16)
    monkeypatch.setattr(prepare_module, "ENCODE_GROUP_CHARS", 2000)
    lines = constitution_paragraphs()
    short = [line[:30] for line in lines] + ["끝<|endoftext|>시작", "\u1112\u1161\u11ab 글", "a\ud800b", "ㅋ"]
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"text": text}) + "\n" for text in short))  # "\ud800" escaped
    second = write_jsonl(tmp_path / "second.jsonl", [f"{n}: {line}" for n, line in enumerate(lines)])
    held_out = write_jsonl(tmp_path / "held.jsonl", lines[:30])
    overrides = [_inputs(first, second), f'data.test_inputs=["{held_out}"]',
                 "data.val_ratio=0.2"]  # fmt: skip
    fast = _prepare(_config(tmp_path / "fast", *overrides))
    assert load_tokenizer(tmp_path / "fast").fast is not None
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    plain = _prepare(
        _config(tmp_path / "plain", *overrides, f"tokenizer.path={tmp_path / 'fast' / 'tokenizer.json'}")
    )
    assert load_tokenizer(tmp_path / "plain").fast is None
    assert plain.splits == fast.splits and [s.splits for s in plain.sources] == [
        s.splits for s in fast.sources
    ]
    for names in fast.shards.values():
        assert all(filecmp.cmp(tmp_path / "fast" / n, tmp_path / "plain" / n, shallow=False) for n in names)
