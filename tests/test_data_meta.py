import json
import shutil

import numpy as np
import pytest

from sllm.config import load_config
from sllm.data.meta import META_FILE, DataMeta, token_dtype
from sllm.data.prepare import prepare
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.tokenizer import load_tokenizer

from .conftest import constitution_paragraphs, write_jsonl
from .test_cli import assert_one_line_error, sllm


def _copy(prepared_dir, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(prepared_dir, copy)
    return copy


def _stored(data_dir) -> dict:
    return json.loads((data_dir / META_FILE).read_text("utf-8"))


def _store(data_dir, document) -> None:
    (data_dir / META_FILE).write_text(json.dumps(document), "utf-8")


def test_prepares_output_reads_back_describing_its_files(prepared_dir, tokenizer):
    meta = DataMeta.read(prepared_dir)
    assert (meta.tokenizer_sha256, meta.vocab_size, meta.eos_id) == (
        tokenizer.sha256,
        tokenizer.vocab_size,
        tokenizer.eos_id,
    )
    assert meta.dtype == token_dtype(tokenizer.vocab_size).name == "uint16"
    for split, counts in meta.splits.items():
        on_disk = sum((prepared_dir / name).stat().st_size for name in meta.shards[split])
        assert on_disk == counts.tokens * 2
    assert sum(c.documents for c in meta.splits.values()) == meta.cleaning.kept > 0
    assert [i.path for i in meta.input_files()] == [s["path"] for s in meta.fingerprint["inputs"]]


def test_write_then_read_round_trips_to_the_same_bytes(prepared_dir, tmp_path):
    meta = DataMeta.read(prepared_dir)
    meta.write(tmp_path)
    assert DataMeta.read(tmp_path) == meta
    assert (tmp_path / META_FILE).read_bytes() == (prepared_dir / META_FILE).read_bytes()


def test_a_version_1_directory_still_loads_and_reads_the_same_tokens(prepared_dir, tmp_path):
    old = _copy(prepared_dir, tmp_path)
    current = DataMeta.read(prepared_dir)
    document = _stored(old)
    for key in ("shard_tokens", "shards", "sources", "cleaning"):
        del document[key]
    document["format_version"] = 1
    _store(old, document)
    for split in current.splits:
        (old / f"{split}-00000.bin").rename(old / f"{split}.bin")
    meta = DataMeta.read(old)
    assert meta.sources == [] and meta.cleaning is None
    for split in current.splits:
        assert meta.shards[split] == [f"{split}.bin"]
        expected = np.asarray(open_split(prepared_dir, split, current))
        assert np.array_equal(np.asarray(open_split(old, split, meta)), expected)


def _set(path: str, value):
    def change(document):
        *parents, last = path.split(".")
        for key in parents:
            document = document[key]
        document[last] = value

    return change


def _delete(key: str):
    return lambda document: document.pop(key)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_set("splits.train.tokens", "12"), "field splits.train.tokens should be an integer, not a string"),
        (_set("vocab_size", True), "field vocab_size should be an integer, not a boolean"),
        (_set("sources", {}), "field sources should be a list, not an object"),
        (_set("cleaning.dropped", None), "field cleaning.dropped should be an object, not null"),
        (_delete("eos_id"), "field eos_id is missing"),
        (
            _set("vocab_size", 70000),
            "dtype uint16 does not match vocab_size 70,000 (prepare stores it as uint32",
        ),
        (_set("dtype", "uint32"), "dtype uint32 does not match vocab_size 512 (prepare stores it as uint16"),
        (_set("eos_id", 512), "eos_id 512 is outside the vocabulary of 512 tokens"),
        (_set("shards.train", []), "shards.train lists 0 files where"),
        (
            _set("shards.val", ["../val.bin"]),
            "shards.val names '../val.bin', which is not a file name inside",
        ),
        (_set("fingerprint.inputs", [7]), "fingerprint.inputs must be a list of objects with a string path"),
        (_set("format_version", "2"), "format_version is missing or not an integer"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_field_of_the_wrong_type_or_value_is_named(prepared_dir, tmp_path, change, problem):
    data_dir = _copy(prepared_dir, tmp_path)
    document = _stored(data_dir)
    change(document)
    _store(data_dir, document)
    with pytest.raises(UserError) as caught:
        DataMeta.read(data_dir)
    message = str(caught.value)
    assert message.startswith(f"{data_dir / META_FILE} is invalid: {problem}")
    assert message.endswith("; run `sllm prepare` again") and "\n" not in message


def test_an_unknown_format_version_says_which_versions_are_read(prepared_dir, tmp_path):
    data_dir = _copy(prepared_dir, tmp_path)
    _store(data_dir, {**_stored(data_dir), "format_version": 3})
    with pytest.raises(UserError) as caught:
        DataMeta.read(data_dir)
    assert str(caught.value) == (
        f"{data_dir / META_FILE} has format version 3, which this sllm does not read (it reads 1, 2); "
        "run `sllm prepare` again or upgrade sllm"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            b'{"format_version": 2,',
            "is damaged (invalid JSON: Expecting property name enclosed in double quotes)",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "is damaged (invalid JSON: nested too deeply)"),
        ('{"vocab_size": "caf\u00e9"}'.encode("latin-1"), "is damaged (not UTF-8 text)"),
        (b"[1, 2]", "is invalid: it holds a list instead of a JSON object"),
    ],
    ids=["not-json", "nested-too-deeply", "not-utf8", "not-an-object"],
)
def test_an_unreadable_file_is_named_with_its_problem(tmp_path, content, problem):
    (tmp_path / META_FILE).write_bytes(content)
    with pytest.raises(UserError) as caught:
        DataMeta.read(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / META_FILE} {problem}; run `sllm prepare` again")


def test_a_missing_file_says_the_directory_is_not_prepared(tmp_path):
    with pytest.raises(
        UserError, match=r"is not a prepared data directory \(no meta\.json\); run `sllm prepare`"
    ):
        DataMeta.read(tmp_path)


def test_the_cli_reports_a_damaged_meta_json_on_one_line(prepared_dir, tmp_path):
    data_dir = _copy(prepared_dir, tmp_path)
    _store(data_dir, {**_stored(data_dir), "vocab_size": 70000})
    result = sllm("data", "info", data_dir)
    assert_one_line_error(
        result, f"{data_dir / META_FILE} is invalid: dtype uint16", "run `sllm prepare` again"
    )


def test_prepare_rebuilds_a_directory_whose_meta_json_is_damaged(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:30])
    overrides = [f"data.inputs={json.dumps([str(corpus)])}", f"data.dir={tmp_path / 'out'}"]
    cfg = load_config(None, [*overrides, "tokenizer.vocab_size=300"])
    first = prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    (tmp_path / "out" / META_FILE).write_text("{", "utf-8")
    messages: list[str] = []
    again = prepare(cfg.data, cfg.tokenizer, log=messages.append)
    assert messages[0].startswith(f"rebuilding: {tmp_path / 'out' / META_FILE} is damaged (invalid JSON:")
    assert again == first == DataMeta.read(tmp_path / "out")
    assert load_tokenizer(tmp_path / "out").sha256 == again.tokenizer_sha256
