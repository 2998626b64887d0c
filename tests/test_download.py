"""`sllm download`: presets streamed into JSONL shards, budgets, resume, and one-line failures.

Offline: the loader is injected and returns a real streaming `datasets` dataset built from
local rows; the hub-unreachable case goes through the real `datasets` call with
HF_HUB_OFFLINE=1 in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sllm.cli import main
from sllm.config import load_config
from sllm.data.download import PRESETS, download, stream_from_hub
from sllm.data.prepare import prepare
from sllm.errors import UserError

from .conftest import SHARED_DATA, constitution_paragraphs

datasets = pytest.importorskip("datasets")


def _hub(rows: list[dict]):
    """A loader standing in for the hub: the rows as a streaming dataset."""
    return lambda preset: datasets.Dataset.from_list(rows).to_iterable_dataset()


def _texts(n: int) -> list[str]:
    return [f"{i}번 문서: {p}" for i, p in enumerate((constitution_paragraphs() * 3)[:n])]


def _shard_texts(out: Path) -> list[list[str]]:
    return [
        [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
        for path in sorted(out.glob("*.jsonl"))
    ]


def _documents(out: Path) -> list[str]:
    return [text for shard in _shard_texts(out) for text in shard]


def _manifest(out: Path) -> dict:
    return json.loads((out / "download.json").read_text(encoding="utf-8"))


def test_shards_hold_the_documents_in_order_with_a_manifest(tmp_path):
    texts = _texts(25)
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)] + [{"text": "  ", "id": 99}]
    result = download("tinystories", tmp_path, shard_docs=10, load=_hub(rows), progress=False)

    shards = _shard_texts(tmp_path)
    assert [len(s) for s in shards] == [10, 10, 5]  # the blank record is not a document
    assert _documents(tmp_path) == texts
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "download.json", "tinystories-00000.jsonl", "tinystories-00001.jsonl", "tinystories-00002.jsonl"
    ]  # fmt: skip
    manifest = _manifest(tmp_path)
    assert manifest["documents"] == 25 and result.manifest.documents == 25
    assert manifest["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert [s["documents"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["finished"] is True and manifest["stopped_by"] == "end"
    assert (manifest["preset"], manifest["hf_id"], manifest["split"]) == (
        "tinystories",
        "roneneldan/TinyStories",
        "train",
    )
    assert manifest["license"] == PRESETS["tinystories"].license


def test_max_docs_stops_without_reading_further(tmp_path):
    texts, pulled = _texts(50), []

    def load(preset):
        for t in texts:
            pulled.append(t)
            yield {"text": t}

    result = download("tinystories", tmp_path, max_docs=7, shard_docs=3, load=load, progress=False)
    assert _documents(tmp_path) == texts[:7]
    assert len(pulled) == 7
    assert result.manifest.stopped_by == "max_docs" and _manifest(tmp_path)["finished"] is True


def test_max_bytes_is_never_exceeded(tmp_path):
    texts = _texts(30)
    sizes = [len(t.encode("utf-8")) for t in texts]
    budget = sum(sizes[:12]) + sizes[12] // 2  # the 13th document would cross it
    result = download(
        "tinystories", tmp_path, max_bytes=budget, load=_hub([{"text": t} for t in texts]), progress=False
    )
    assert _documents(tmp_path) == texts[:12]
    assert result.manifest.bytes == sum(sizes[:12]) <= budget
    assert result.manifest.stopped_by == "max_bytes"


def test_several_fields_are_joined_into_one_document(tmp_path):
    rows = [
        {
            "guid": "a",
            "sentence1": "숙소 위치는 찾기 쉬웠어요.",
            "sentence2": "숙소를 찾기 쉬웠습니다.",
            "label": 4.2,
        },
        {"guid": "b", "sentence1": "방이 넓어요.", "sentence2": "", "label": 1.0},
    ]
    download("klue-sts", tmp_path, load=_hub(rows), progress=False)
    assert _shard_texts(tmp_path) == [["숙소 위치는 찾기 쉬웠어요.\n숙소를 찾기 쉬웠습니다.", "방이 넓어요."]]
    assert PRESETS["klue-nli"].fields == ("premise", "hypothesis")


def test_a_missing_field_names_the_fields_found(tmp_path):
    with pytest.raises(
        UserError, match=r"klue/klue \(nli\) has no field 'hypothesis' \(fields: premise, label\)"
    ):
        download("klue-nli", tmp_path, load=_hub([{"premise": "전제", "label": 0}]), progress=False)
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob(".*"))


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare").is_dir(), reason="needs ../shared/data")
def test_tiny_shakespeare_becomes_one_document_per_speech(tmp_path):
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if s.strip()]
    download("tiny-shakespeare", tmp_path, load=_hub([{"text": text}]), progress=False)
    documents = _documents(tmp_path)
    assert len(documents) == len(speeches) > 7000
    assert documents[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_nsmc_reader_options_parse_the_github_tsv(tmp_path):
    tsv = tmp_path / "ratings_train.txt"
    tsv.write_text('id\tdocument\tlabel\n1\t"최고"라는 말밖에\t1\n2\t\t0\n3\tnull\t0\n', encoding="utf-8")
    local = dataclasses.replace(PRESETS["nsmc"], data_files=str(tsv))
    download("nsmc", tmp_path / "out", load=lambda _: stream_from_hub(local), progress=False)
    assert _shard_texts(tmp_path / "out") == [['"최고"라는 말밖에', "null"]]


def test_a_finished_download_run_again_does_nothing(tmp_path):
    download(
        "tinystories", tmp_path, shard_docs=4, load=_hub([{"text": t} for t in _texts(10)]), progress=False
    )
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def unreachable(preset):
        raise AssertionError("a finished download must not open the stream")

    again = download("tinystories", tmp_path, shard_docs=4, load=unreachable, progress=False)
    assert again.already_done and again.manifest.documents == 10
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_an_interrupted_download_resumes_after_the_last_complete_shard(tmp_path):
    texts = _texts(23)

    def dropping(preset):
        for i, t in enumerate(texts):
            if i == 17:
                raise ConnectionError("Connection reset by peer")
            yield {"text": t}

    with pytest.raises(UserError) as failure:
        download("tinystories", tmp_path, shard_docs=5, load=dropping, progress=False)
    assert str(failure.value).startswith(
        "cannot reach the Hugging Face hub (offline?) to download tinystories (Connection reset by peer)"
    )
    assert [len(s) for s in _shard_texts(tmp_path)] == [5, 5, 5]  # the half shard is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _manifest(tmp_path)["finished"] is False and _manifest(tmp_path)["documents"] == 15

    orphan = tmp_path / "tinystories-00003.jsonl"  # renamed into place, then a crash: never recorded
    orphan.write_text('{"text": "not in the manifest"}\n')
    assert download("tinystories", tmp_path, max_docs=15, load=dropping, progress=False).already_done
    assert not orphan.exists()
    result = download(
        "tinystories", tmp_path, shard_docs=5, load=_hub([{"text": t} for t in texts]), progress=False
    )
    assert _documents(tmp_path) == texts  # no document twice, none lost
    assert [len(s) for s in _shard_texts(tmp_path)] == [5, 5, 5, 5, 3]
    assert result.manifest.finished and result.manifest.documents == 23


def test_a_larger_budget_extends_a_finished_download(tmp_path):
    rows = [{"text": t} for t in _texts(20)]
    download("tinystories", tmp_path, max_docs=5, load=_hub(rows), progress=False)
    result = download("tinystories", tmp_path, max_docs=12, load=_hub(rows), progress=False)
    assert not result.already_done
    assert _documents(tmp_path) == [r["text"] for r in rows[:12]]
    assert download("tinystories", tmp_path, max_docs=8, load=_hub(rows), progress=False).already_done


def test_another_preset_in_the_same_directory_is_refused(tmp_path):
    download("tinystories", tmp_path, load=_hub([{"text": "a story"}]), progress=False)
    with pytest.raises(UserError, match="holds a download of tinystories; choose another --out for kr3"):
        download("kr3", tmp_path, load=_hub([{"Review": "맛있어요"}]), progress=False)


def test_budgets_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--max-docs must be a positive number, not 0"):
        download("tinystories", tmp_path, max_docs=0, load=_hub([]), progress=False)


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"needs the `datasets` package; pip install 'sllm\[data\]'"):
        download("tinystories", tmp_path, progress=False)


@pytest.mark.parametrize(
    ("preset", "offline", "host"),
    [
        ("tinystories", {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "the Hugging Face hub"),
        pytest.param(  # the hub client retries a refused connection for ~25 s
            "tinystories",
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "the Hugging Face hub",
            marks=pytest.mark.slow,
        ),
        ("nsmc", {"HF_HUB_OFFLINE": "1"}, "raw.githubusercontent.com"),
    ],
)
def test_offline_says_cannot_reach_and_leaves_no_download_behind(tmp_path, preset, offline, host):
    env = {**os.environ, **offline, "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = tmp_path / "downloads" / preset
    proc = subprocess.run(
        [sys.executable, "-m", "sllm", "download", preset, "--out", str(out), "--max-docs", "5"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"sllm: error: cannot reach {host} (offline?) to download {preset} (")
    assert "HF_ENDPOINT" in proc.stderr and "sllm prepare --input" in proc.stderr
    assert not out.exists()


def _unreachable_file(exc_message: str):
    def load(preset):
        raise FileNotFoundError(exc_message)

    return load


def test_a_missing_file_on_a_host_that_answers_may_have_changed_on_one_that_does_not_is_offline(
    tmp_path, monkeypatch
):
    import socket

    listening = socket.create_server(("127.0.0.1", 0))
    answering = f"http://127.0.0.1:{listening.getsockname()[1]}/ratings.txt"
    for url, expected in (
        (answering, "the dataset may have changed"),
        ("http://127.0.0.1:9/r.txt", "(offline?)"),
    ):
        preset = dataclasses.replace(PRESETS["nsmc"], data_files=url)
        monkeypatch.setitem(PRESETS, "nsmc", preset)
        with pytest.raises(UserError) as failure:
            download(
                "nsmc", tmp_path / "out", load=_unreachable_file(f"Unable to find '{url}'"), progress=False
            )
        assert expected in str(failure.value) and f"Unable to find '{url}'" in str(failure.value)
        assert not (tmp_path / "out").exists()
    listening.close()


def test_a_failure_before_the_first_shard_leaves_an_existing_directory_without_a_manifest(tmp_path):
    def dropping(preset):
        yield {"text": "one"}
        raise ConnectionError("Connection reset by peer")

    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        download("tinystories", tmp_path, shard_docs=5, load=dropping, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "wikipedia-ko", "--out", "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'wikipedia-ko'" in err
    assert all(name in err for name in PRESETS)


def test_list_shows_each_preset_source_and_license(capsys):
    main(["download", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PRESETS) + 1
    for preset, line in zip(PRESETS.values(), lines[1:], strict=True):
        assert line.startswith(preset.name) and preset.source in line and preset.license in line
    for hub_id in (
        "wikimedia/wikipedia (20231101.ko)",
        "klue/klue (nli)",
        "HuggingFaceFW/fineweb-edu (sample-10BT)",
    ):
        assert any(hub_id in line for line in lines)


def test_downloaded_directory_prepares_end_to_end(tmp_path):
    texts = _texts(120)
    download(
        "kr3",
        tmp_path / "kr3",
        shard_docs=50,
        load=_hub([{"Review": t, "Rating": 1} for t in texts]),
        progress=False,
    )
    cfg = load_config(
        None,
        [f"data.inputs={json.dumps([str(tmp_path / 'kr3')])}", f"data.dir={tmp_path / 'data'}",
         "tokenizer.vocab_size=400", "data.val_ratio=0.1"],
    )  # fmt: skip
    meta = prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    assert sum(split.documents for split in meta.splits.values()) == 120
