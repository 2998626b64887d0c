import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sllm.config import load_config
from sllm.data.meta import DataMeta
from sllm.data.mixture import resolve_sources
from sllm.data.prepare import prepare, train_tokenizer
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.tokenizer import load_tokenizer, nfc

from .conftest import constitution_paragraphs, write_jsonl
from .test_cli import assert_one_line_error, sllm


def _config(tmp_path, inputs, *overrides):
    return load_config(
        None,
        [f"data.inputs={json.dumps([str(p) for p in inputs])}", f"data.dir={tmp_path / 'out'}",
         "tokenizer.vocab_size=400", *overrides],
    )  # fmt: skip


def _run(cfg, messages=None):
    return prepare(cfg.data, cfg.tokenizer, log=(messages.append if messages is not None else lambda _: None))


def _documents(data_dir, split, meta):
    """Decode a split's token file back into its documents (split at EOS)."""
    tokens = np.asarray(open_split(data_dir, split, meta)).tolist()
    tok = load_tokenizer(data_dir)
    docs, current = [], []
    for t in tokens:
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert current == []
    return docs


def test_token_counts_equal_encoded_documents_plus_eos(tmp_path):
    texts = constitution_paragraphs()[:60]
    cfg = _config(tmp_path, [write_jsonl(tmp_path / "c.jsonl", texts)], "data.val_ratio=0.2")
    meta = _run(cfg)
    tok = load_tokenizer(cfg.data.dir)
    expected = sum(len(tok.encode(t)) + 1 for t in texts)
    splits = meta.splits
    assert splits["train"].tokens + splits["val"].tokens + splits["test"].tokens == expected
    assert splits["train"].documents + splits["val"].documents == 60
    for split in ("train", "val"):
        size = (tmp_path / "out" / f"{split}-00000.bin").stat().st_size
        assert size == splits[split].tokens * 2  # uint16
    assert meta.dtype == "uint16" and meta.eos_id == tok.eos_id
    assert meta.tokenizer_sha256 == tok.sha256


def test_a_char_tokenizer_says_a_requested_vocab_size_does_not_apply(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:40])
    messages: list[str] = []
    meta = _run(_config(tmp_path, [corpus], "data.val_ratio=0", "tokenizer.kind=char"), messages)
    note = (
        "--vocab-size (tokenizer.vocab_size) 400 does not apply to the char kind: "
        f"its {meta.vocab_size:,} tokens are the characters seen plus the special tokens"
    )
    assert messages[0] == note and meta.vocab_size != 400
    default_size = ["data.val_ratio=0", "tokenizer.kind=char", "tokenizer.vocab_size=8000"]
    messages.clear()
    _run(_config(tmp_path / "default", [corpus], *default_size), messages)
    assert not [m for m in messages if "--vocab-size" in m]  # nobody asked for a size


def test_bpe_training_says_when_the_corpus_supports_fewer_tokens_than_requested(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:40])
    cfg = _config(tmp_path, [corpus], "tokenizer.vocab_size=100000")
    tokenizer = train_tokenizer(resolve_sources(cfg.data), cfg.data, cfg.tokenizer)
    assert capsys.readouterr().out == (
        f"the corpus supported only {tokenizer.vocab_size:,} of the requested 100,000 BPE tokens (the merges "
        "ran out: no pair is left that occurs 2+ times); give more text or a smaller --vocab-size\n"
    )
    cfg = _config(tmp_path, [corpus], "tokenizer.vocab_size=300")
    assert train_tokenizer(resolve_sources(cfg.data), cfg.data, cfg.tokenizer).vocab_size == 300
    assert capsys.readouterr().out == ""


def test_split_is_by_document_and_seeded(tmp_path):
    texts = [f"문서 번호 {i}: " + p for i, p in enumerate(constitution_paragraphs()[:80])]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    first = _run(_config(tmp_path, [corpus], "data.val_ratio=0.25"))
    out = tmp_path / "out"
    train_docs, val_docs = _documents(out, "train", first), _documents(out, "val", first)
    assert sorted(train_docs + val_docs) == sorted(nfc(t) for t in texts)  # whole documents
    assert not set(train_docs) & set(val_docs)
    assert 10 <= len(val_docs) <= 30

    again = tmp_path / "again"
    cfg = _config(tmp_path, [corpus], "data.val_ratio=0.25", f"data.dir={again}")
    second = _run(cfg)
    assert _documents(again, "val", second) == val_docs  # same seed, same split

    other = tmp_path / "other"
    third = _run(_config(tmp_path, [corpus], "data.val_ratio=0.25", f"data.dir={other}", "data.split_seed=7"))
    assert _documents(other, "val", third) != val_docs


def test_dtype_switches_to_uint32_above_65536_tokens(tmp_path):
    alphabet = "".join(chr(0x20000 + i) for i in range(66000))
    corpus = tmp_path / "wide.txt"
    corpus.write_text(alphabet + "\n\n" + alphabet[::-1] + "\n\n" + alphabet[:100], "utf-8")
    cfg = _config(tmp_path, [corpus], "tokenizer.kind=char", "data.txt_mode=paragraph", "data.val_ratio=0")
    meta = _run(cfg)
    assert meta.vocab_size > 65536 and meta.dtype == "uint32"
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=np.uint32)
    assert tokens.max() >= 65536
    assert len(tokens) == 66000 * 2 + 100 + 3


def test_second_run_is_a_no_op_and_changed_input_rebuilds(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:40])
    cfg = _config(tmp_path, [corpus])
    _run(cfg)
    train_bin = tmp_path / "out" / "train-00000.bin"
    stamp = train_bin.stat().st_mtime_ns
    messages: list[str] = []
    _run(cfg, messages)
    assert "up to date" in messages[0]
    assert train_bin.stat().st_mtime_ns == stamp

    write_jsonl(corpus, constitution_paragraphs()[:41])
    meta = _run(cfg)
    assert meta.splits["train"].documents + meta.splits["val"].documents == 41
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "좋은 줄"}\n{"text": "깨진 줄"\n{"text": "다음 줄"}\n', "utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        _run(_config(tmp_path, [corpus], "data.val_ratio=0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, no partial work


def test_skip_mode_counts_malformed_lines(tmp_path):
    corpus = tmp_path / "bad.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        handle.write('{"text": "좋은 줄"}\nnot json\n{"other": 1}\n{"text": "다음 줄"}\n')
    messages: list[str] = []
    meta = _run(_config(tmp_path, [corpus], "data.val_ratio=0", "data.on_error=skip"), messages)
    assert meta.skipped["malformed_lines"] == 2
    assert meta.splits["train"].documents == 2
    assert "2 malformed lines" in messages[-1]


def test_wrong_text_field_is_reported(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["하나", "둘"], field="body")
    with pytest.raises(UserError, match="no string field 'text'.*body"):
        _run(_config(tmp_path, [corpus]))
    meta = _run(_config(tmp_path, [corpus], "data.text_field=body", "data.val_ratio=0"))
    assert meta.splits["train"].documents == 2


def test_txt_modes_file_and_paragraph(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("첫 문단\n\n둘째 문단\n", "utf-8")
    (tmp_path / "docs" / "b.txt").write_text("다른 파일", "utf-8")
    per_file = _run(_config(tmp_path, [tmp_path / "docs"], "data.val_ratio=0", "tokenizer.kind=char"))
    assert per_file.splits["train"].documents == 2
    cfg = _config(
        tmp_path,
        [tmp_path / "docs"],
        "data.val_ratio=0",
        "tokenizer.kind=char",
        "data.txt_mode=paragraph",
    )
    assert _run(cfg).splits["train"].documents == 3


def test_invalid_utf8_reports_byte_offset(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("정상\n".encode() + b"caf\xe9\n")
    with pytest.raises(UserError, match=r"invalid UTF-8 at byte 10 \(line 2\)"):
        _run(_config(tmp_path, [corpus], "data.val_ratio=0"))


def test_empty_corpus_and_missing_input_are_user_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", "utf-8")
    with pytest.raises(UserError, match="no non-empty documents"):
        _run(_config(tmp_path, [empty]))
    with pytest.raises(UserError, match="not found"):
        _run(_config(tmp_path, [tmp_path / "missing.jsonl"]))


def test_too_few_documents_for_validation_is_explained(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["하나뿐인 문서"])
    with pytest.raises(UserError, match="val split got no documents"):
        _run(_config(tmp_path, [corpus], "tokenizer.kind=char"))


def test_interrupted_prepare_leaves_previous_output_intact(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:30])
    cfg = _config(tmp_path, [corpus])
    _run(cfg)
    before = DataMeta.read(cfg.data.dir)
    write_jsonl(corpus, constitution_paragraphs()[:31])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sllm.data.prepare._check_splits", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    assert DataMeta.read(cfg.data.dir) == before
    assert sorted(os.listdir(tmp_path)) == [".out.partial", "c.jsonl", "out"]  # kept, to resume
    monkeypatch.undo()
    messages: list[str] = []
    meta = _run(cfg, messages)
    assert "resuming" in messages[0]
    assert meta.splits["train"].documents + meta.splits["val"].documents == 31
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "out"]


def test_unreadable_input_file_is_a_user_error(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["하나", "둘"])
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path) == str(corpus):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(UserError, match=r"cannot read .*c\.jsonl: Permission denied"):
        _run(_config(tmp_path, [corpus], "data.val_ratio=0", "tokenizer.kind=char"))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_lone_surrogate_escapes_in_jsonl_prepare_as_the_replacement_character(tmp_path, kind):
    texts = constitution_paragraphs()[:20]
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t}) for t in texts] + ['{"text": "깨진 \\ud800 문자"}']
    corpus.write_text("\n".join(lines) + "\n", "utf-8")
    meta = _run(_config(tmp_path, [corpus], "data.val_ratio=0", f"tokenizer.kind={kind}"))
    assert "깨진 \ufffd 문자" in _documents(tmp_path / "out", "train", meta)


@pytest.mark.parametrize("size", [1001, 1000], ids=["odd", "even"])
def test_a_truncated_token_shard_is_named_as_damaged(prepared_dir, tmp_path, size):
    damaged = tmp_path / "d"
    shutil.copytree(prepared_dir, damaged)
    meta = DataMeta.read(damaged)
    with open(damaged / "train-00000.bin", "r+b") as handle:
        handle.truncate(size)
    with pytest.raises(
        UserError, match=r"train-00000\.bin is damaged: 1,00[01] bytes where meta\.json promises"
    ):
        open_split(damaged, "train", meta)
    assert_one_line_error(sllm("data", "info", damaged), "train-00000.bin is damaged", "run `sllm prepare`")


def test_prepare_never_imports_torch(tmp_path):
    """Startup and memory: torch costs a second and ~190 MB that turning text into tokens never needs."""
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:40])
    program = (
        "import sys\nfrom sllm.cli import main\n"
        "try:\n    main(sys.argv[1:])\nfinally:\n    print('torch' in sys.modules)"
    )
    args = [
        "prepare",
        "--input",
        corpus,
        "--out",
        tmp_path / "out",
        "tokenizer.vocab_size=300",
        "--val-ratio",
        0.1,
    ]
    result = subprocess.run([sys.executable, "-c", program, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"
