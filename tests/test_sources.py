import gzip
import json
from pathlib import Path

import pytest

from sllm.data.sources import HFDataset, ReadOptions, SourceStats, expand_inputs, read_documents
from sllm.errors import UserError

from .conftest import SHARED_DATA

TEXTS = ["첫째 문서입니다.", "second document, with a comma", '셋째 "인용" 문서']


def _read(inputs, **options) -> list[str]:
    return list(
        read_documents(expand_inputs([str(p) for p in inputs]), ReadOptions(**options), SourceStats())
    )


def _zst(path: Path, data: bytes) -> Path:
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def _json_array(records) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=2).encode()


def test_json_array_of_objects_plain_gz_and_zst(tmp_path):
    data = _json_array([{"review": t, "rating": "10"} for t in TEXTS])
    (tmp_path / "a.json").write_bytes(data)
    with gzip.open(tmp_path / "b.json.gz", "wb") as handle:
        handle.write(data)
    _zst(tmp_path / "c.json.zst", data)
    for name in ("a.json", "b.json.gz", "c.json.zst"):
        assert _read([tmp_path / name], text_field="review") == TEXTS


def test_json_array_spanning_many_chunks_is_read_record_by_record(tmp_path, monkeypatch):
    monkeypatch.setattr("sllm.data.sources.JSON_CHUNK_BYTES", 7)  # every record crosses chunk edges
    texts = [f"문서 {i} " + "가나다" * (i % 5) for i in range(200)]
    (tmp_path / "many.json").write_bytes(json.dumps([{"text": t} for t in texts]).encode())
    assert _read([tmp_path / "many.json"]) == texts


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "one object"}', "not a JSON array"),
        ('[{"text": "a"}, {"text": "b"', "ends early"),
        ('[{"text": "a"} {"text": "b"}]', "malformed JSON after record 1"),
        ('[{"text": "a"}] trailing', "after the closing"),
    ],
)
def test_broken_json_arrays_are_named(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content, "utf-8")
    with pytest.raises(UserError, match=message):
        _read([tmp_path / "bad.json"])


def test_dotted_text_field_reads_nested_records(tmp_path):
    (tmp_path / "n.jsonl").write_text(
        "".join(json.dumps({"meta": {"text": t}}, ensure_ascii=False) + "\n" for t in TEXTS), "utf-8"
    )
    assert _read([tmp_path / "n.jsonl"], text_field="meta.text") == TEXTS
    with pytest.raises(
        UserError, match=r"n\.jsonl:1: no string field 'meta\.body' \(fields under 'meta': text\)"
    ):
        _read([tmp_path / "n.jsonl"], text_field="meta.body")


def test_csv_with_crlf_quotes_and_newlines_in_cells(tmp_path):
    csv_bytes = 'Q,A,label\r\n"안녕, 반가워",응,0\r\n"두 줄\r\n질문",답,1\r\n'.encode()
    (tmp_path / "qa.csv").write_bytes(csv_bytes)
    assert _read([tmp_path / "qa.csv"], text_field="Q") == ["안녕, 반가워", "두 줄\r\n질문"]
    with pytest.raises(UserError, match=r"qa\.csv has no column 'text' \(columns: Q, A, label\)"):
        _read([tmp_path / "qa.csv"])


def test_tsv_keeps_quotes_as_characters(tmp_path):
    (tmp_path / "s.tsv").write_text('id\tsentence\n1\t"따옴표로 시작\n2\t끝에 "따옴표"\n', "utf-8")
    assert _read([tmp_path / "s.tsv"], text_field="sentence") == ['"따옴표로 시작', '끝에 "따옴표"']


def test_parquet_column_read_by_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr("sllm.data.sources.PARQUET_BATCH_ROWS", 2)
    table = pa.table({"id": [1, 2, 3], "content": TEXTS, "meta": [{"text": t} for t in TEXTS]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    assert _read([tmp_path / "t.parquet"], text_field="content") == TEXTS
    assert _read([tmp_path / "t.parquet"], text_field="meta.text") == TEXTS
    with pytest.raises(UserError, match=r"t\.parquet has no column 'text' \(columns: id, content, meta\)"):
        _read([tmp_path / "t.parquet"])


def test_missing_optional_package_is_a_user_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    monkeypatch.setattr("importlib.import_module", lambda name: no_pyarrow(name))
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"needs the `pyarrow` package; pip install 'sllm\[data\]'"):
        _read([tmp_path / "t.parquet"])


def test_directory_and_glob_find_every_known_format(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("텍스트", "utf-8")
    (tmp_path / "d" / "sub" / "b.csv").write_text("text\n씨에스브이\n", "utf-8")
    _zst(tmp_path / "d" / "sub" / "c.jsonl.zst", b'{"text": "zst"}\n')
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    found = expand_inputs([str(tmp_path / "d")])
    assert [p.name for p in found] == ["a.txt", "b.csv", "c.jsonl.zst"]
    assert [p.name for p in expand_inputs([str(tmp_path / "d" / "**" / "*.csv")])] == ["b.csv"]
    assert _read([tmp_path / "d"]) == ["텍스트", "씨에스브이", "zst"]
    assert expand_inputs(["hf:some/name"]) == [HFDataset("some/name")]


def test_binary_and_damaged_compressed_files_are_user_errors(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"[\x00\x01\x02]")
    with pytest.raises(UserError, match="binary file"):
        _read([tmp_path / "bin.json"])
    (tmp_path / "cut.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    pytest.importorskip("zstandard")
    with pytest.raises(UserError, match=r"cannot read .*cut\.jsonl\.zst"):
        _read([tmp_path / "cut.jsonl.zst"])


@pytest.mark.skipif(not (SHARED_DATA / "nsmc").is_dir(), reason="shared data not present")
def test_real_shared_files_read_in_every_format():
    reviews = _read([SHARED_DATA / "nsmc" / "raw" / "10001.json"], text_field="review")
    assert len(reviews) > 10 and reviews[0] == "전체관람가는 아닌것 같아요"
    questions = _read([SHARED_DATA / "chatbot_data" / "ChatbotData.csv"], text_field="Q")
    assert len(questions) == 11823 and not any(q.endswith("\r") for q in questions)
    sentences = _read([SHARED_DATA / "korsts" / "sts-dev.tsv"], text_field="sentence1")
    assert len(sentences) == 1500


def _saved_dataset(tmp_path, as_dict: bool) -> Path:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": TEXTS, "nested": [{"body": t.upper()} for t in TEXTS]})
    target = tmp_path / ("dict" if as_dict else "single")
    (datasets.DatasetDict({"train": data, "validation": data.select([0])}) if as_dict else data).save_to_disk(
        str(target)
    )
    return target


def test_hf_dataset_saved_to_disk_reads_split_and_nested_field(tmp_path):
    single = _saved_dataset(tmp_path, as_dict=False)
    assert _read([f"hf:{single}"]) == TEXTS
    splits = _saved_dataset(tmp_path, as_dict=True)
    assert _read([f"hf:{splits}"], hf_split="validation") == TEXTS[:1]
    assert _read([f"hf:{splits}"], text_field="nested.body") == [t.upper() for t in TEXTS]
    with pytest.raises(UserError, match="has no split 'test' \\(splits: train, validation\\)"):
        _read([f"hf:{splits}"], hf_split="test")
    with pytest.raises(UserError, match="has no column 'review' \\(columns: text, nested\\)"):
        _read([f"hf:{single}"], text_field="review")


def test_hf_dataset_from_local_data_files_and_unknown_name(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "train.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), "utf-8"
    )
    assert _read([f"hf:{tmp_path / 'local'}"]) == TEXTS
    assert _read([f"hf:{tmp_path / 'local'}"], hf_streaming=False) == TEXTS
    with pytest.raises(UserError, match="cannot load dataset hf:.*missing"):
        _read([f"hf:{tmp_path / 'missing'}"])


def test_prepare_cli_wrong_column_is_one_line_and_exit_2(tmp_path, capsys):
    from sllm.cli import main

    (tmp_path / "qa.csv").write_text("Q,A\n질문,답\n", "utf-8")
    args = [
        "prepare",
        "--input",
        str(tmp_path / "qa.csv"),
        "--text-field",
        "text",
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "qa.csv has no column 'text' (columns: Q, A)" in error


def test_lone_surrogates_in_json_records_become_the_replacement_character(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ab\\ud800cd"}\n{"text": "\\udfff end"}\n{"text": "pair \\ud83d\\ude00"}\n')
    assert _read([path]) == ["ab\ufffdcd", "\ufffd end", "pair 😀"]


@pytest.mark.parametrize(
    "line",
    ['{"text": "a"}\n', ' {"text": 1}\n', '{"a": 1} x\n', '{"a": 1}{"b": 2}\n', "[1, 2]\r\n", "\n", "",
     '{"a": NaN}\n', '{"a": 1' + "0" * 5000 + "}\n", "[" * 100_000 + "]" * 100_000, '{"a": "\\ud800"}',
     '{"a": 1}\x0c\n', '{"a": 1,}\n', '"s"'],
)  # fmt: skip
def test_a_jsonl_line_parses_as_the_full_decoder_parses_it(line):
    """The C scanner's shortcut gives the full decoder's value, or its error and position."""
    from sllm.files import loads_json, loads_json_line

    def outcome(parse):
        try:
            return "value", parse(line)
        except json.JSONDecodeError as error:
            return "error", error.msg, error.pos

    assert outcome(loads_json_line) == outcome(loads_json)
