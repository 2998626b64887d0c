"""Damaged or hostile files: every file sllm reads fails on one `sllm: error:` line that names it.

The CLI runs in-process: an exception other than its exit would surface here as the traceback
a user would have seen, so each case proves "one line, exit 2, no traceback"."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sllm.cli import main
from sllm.data.meta import META_FILE, DataMeta
from sllm.data.verify import STAMP_FILE, open_split
from sllm.run import CHECKPOINTS, LATEST, MODEL_FILE, load_latest, step_name

from .conftest import constitution_paragraphs, random_run, write_jsonl

NESTED = "[" * 10_000 + "]" * 10_000  # deeper than Python's recursion limit
NOT_UTF8 = b"\xff\xfe\xfa"


def cli_error(capsys, *argv) -> str:
    """The one stderr line of a CLI call that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("sllm: error: "), lines
    return lines[0]


@pytest.fixture
def run(tmp_path, tokenizer):
    return random_run(tmp_path / "run", tokenizer)


@pytest.fixture
def data(tmp_path, prepared_dir):
    return shutil.copytree(prepared_dir, tmp_path / "data")


def _checkpoint(run_dir):
    return run_dir / CHECKPOINTS / step_name(7)


# ---- deep nesting ------------------------------------------------------------------------


def _prepare_args(tmp_path, corpus, *overrides):
    return ["prepare", "--input", corpus, "--out", tmp_path / "out", "tokenizer.vocab_size=300", *overrides]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_in_prepare_input_is_malformed_input(tmp_path, capsys, suffix):
    corpus = tmp_path / f"deep{suffix}"
    record = '{"text": ' + NESTED + "}"
    corpus.write_text(record + "\n" if suffix == ".jsonl" else f"[{record}]", "utf-8")
    line = cli_error(capsys, *_prepare_args(tmp_path, corpus))
    assert str(corpus) in line and "nested too deeply" in line


def test_deeply_nested_json_line_is_skipped_with_on_error_skip(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:80])
    corpus.write_text('{"text": ' + NESTED + "}\n" + corpus.read_text("utf-8"), "utf-8")
    main([str(a) for a in _prepare_args(tmp_path, corpus, "data.on_error=skip", "log.progress=false")])
    assert DataMeta.read(tmp_path / "out").skipped["malformed_lines"] == 1


@pytest.mark.parametrize("reader", ["sft", "mc", "tokenizer", "config"])
def test_deeply_nested_files_are_named(tmp_path, capsys, run, reader):
    hostile = {"sft": tmp_path / "sft.jsonl", "mc": tmp_path / "mc.jsonl", "config": tmp_path / "c.yaml"}
    hostile["tokenizer"] = run / "tokenizer.json"
    hostile[reader].write_text("model: " + NESTED if reader == "config" else NESTED, "utf-8")
    argv = {
        "sft": ["finetune", "sft", "--run", run, "--data", hostile["sft"], "--out", tmp_path / "sft"],
        "mc": ["eval", "--run", run, "--mc", hostile["mc"]],
        "tokenizer": ["generate", "--run", run, "--prompt", "a"],
        "config": ["info", "--config", hostile["config"]],
    }[reader]
    line = cli_error(capsys, *argv)
    assert str(hostile[reader]) in line
    assert reader == "mc" or "nested too deeply" in line


# ---- bytes that are not UTF-8 -------------------------------------------------------------


@pytest.mark.parametrize("name", ["LATEST", "tokenizer.json", "config.yaml", "checkpoint meta.json"])
def test_bytes_that_are_not_utf8_are_named(tmp_path, capsys, run, name):
    damaged = {
        "LATEST": run / CHECKPOINTS / LATEST,
        "tokenizer.json": run / "tokenizer.json",
        "config.yaml": tmp_path / "config.yaml",
        "checkpoint meta.json": _checkpoint(run) / "meta.json",
    }[name]
    damaged.write_bytes(NOT_UTF8)
    if name == "config.yaml":
        line = cli_error(capsys, "info", "--config", damaged)
    else:
        line = cli_error(capsys, "generate", "--run", run, "--prompt", "a")
    if name == "checkpoint meta.json":
        assert (
            f"{run / CHECKPOINTS} verifies ({step_name(7)}: meta.json unreadable (UnicodeDecodeError))"
            in line
        )
    else:
        assert f"{damaged} is damaged (not UTF-8 text)" in line


# ---- wrong types in a checkpoint's meta.json ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("step", "7", "an integer"), ("val_loss", "low", "a number"), ("model_config", 5, "an object")],
)
def test_wrong_types_in_checkpoint_meta_are_refused(capsys, run, field, value, expected):
    meta = _checkpoint(run) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text("utf-8")), field: value}), "utf-8")
    line = cli_error(capsys, "generate", "--run", run, "--prompt", "a")
    assert str(run / CHECKPOINTS) in line and f"field {field} should be {expected}" in line


def test_a_damaged_newest_checkpoint_falls_back_with_one_warning(capsys, run):
    older = shutil.copytree(_checkpoint(run), run / CHECKPOINTS / step_name(3))
    (older / "meta.json").write_text((older / "meta.json").read_text().replace('"step": 7', '"step": 3'))
    (_checkpoint(run) / "meta.json").write_text('{"step": "x"}')
    assert load_latest(run).step == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: checkpoint {_checkpoint(run)} is damaged (meta.json is invalid: field step should be "
        f"an integer, not a string); using {step_name(3)}"
    ]


# ---- weights that do not fit, even with a matching sha256 ----------------------------------


def _rewrite_weights(run_dir, change) -> None:
    """Replace the weights and record their new sha256, as a user (or an attacker) could."""
    checkpoint = _checkpoint(run_dir)
    weights = checkpoint / MODEL_FILE
    if callable(change):
        save_file(change(load_file(weights)), weights)
    else:
        weights.write_bytes(change)
    meta = json.loads((checkpoint / "meta.json").read_text("utf-8"))
    meta["files"][MODEL_FILE] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta), "utf-8")


def _resized(weights):
    return {**weights, "wte.weight": torch.zeros(3, 3)}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_resized, "tensor 'wte.weight' has shape [3, 3], the model expects ["),
        (lambda w: {k: v for k, v in w.items() if k != "norm_f.weight"}, "tensor 'norm_f.weight' is missing"),
        (lambda w: {**w, "extra": torch.zeros(2)}, "it holds tensor 'extra', which the model does not have"),
        (
            lambda w: {**w, "norm_f.weight": w["norm_f.weight"].to(torch.int32)},
            "'norm_f.weight' holds torch.int32",
        ),
        (
            b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header",
            "is damaged (Error while deserializing header",
        ),
    ],
    ids=["shape", "missing", "extra", "integer-dtype", "garbage-header"],
)
def test_weights_that_do_not_fit_the_model_are_refused(capsys, run, change, expected):
    _rewrite_weights(run, change)
    line = cli_error(capsys, "generate", "--run", run, "--prompt", "a")
    assert f"{_checkpoint(run) / MODEL_FILE}" in line and expected in line


def test_weights_of_another_float_dtype_are_converted_with_a_warning(capsys, run):
    _rewrite_weights(run, lambda w: {k: v.to(torch.float16) for k, v in w.items()})
    from sllm.infer.engine import TextGenerator

    generator = TextGenerator.from_run(run, device="cpu")
    assert all(p.dtype == torch.float32 for p in generator.model.parameters())
    assert "holds torch.float16 weights; converted to torch.float32" in capsys.readouterr().err


# ---- token shards ---------------------------------------------------------------------------


def _poke_token(data_dir, value: int) -> None:
    shard = data_dir / "train-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[5] = value
    tokens.tofile(shard)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, capsys, data):
    meta = json.loads((data / META_FILE).read_text("utf-8"))
    del meta["checksums"]  # an attacker may drop them: the range check stands alone
    (data / META_FILE).write_text(json.dumps(meta), "utf-8")
    _poke_token(data, 60_000)
    line = cli_error(capsys, "data", "info", data)
    assert f"{data / 'train-00000.bin'} holds token id 60000, outside the vocabulary of 512" in line
    line = cli_error(capsys, "train", "--data", data, "--out", tmp_path / "r", "train.max_steps=1")
    assert "holds token id 60000" in line


def test_a_meta_json_whose_vocab_size_is_too_small_is_refused(tmp_path, capsys, data):
    meta = json.loads((data / META_FILE).read_text("utf-8"))
    (data / META_FILE).write_text(json.dumps({**meta, "vocab_size": 300}), "utf-8")
    expected = f"{data / META_FILE} is invalid: vocab_size 300 is not the 512 tokens of tokenizer.json"
    assert expected in cli_error(capsys, "train", "--data", data, "--out", tmp_path / "r")
    assert expected in cli_error(capsys, "data", "verify", data)


def test_prepare_records_a_checksum_per_shard_and_a_changed_shard_is_refused(capsys, data):
    meta = DataMeta.read(data)
    names = [name for shards in meta.shards.values() for name in shards]
    assert meta.checksums == {n: hashlib.sha256((data / n).read_bytes()).hexdigest() for n in names}
    _poke_token(data, 7)  # same size, another token
    line = cli_error(capsys, "data", "info", data)
    assert f"{data / 'train-00000.bin'} does not match its sha256 in meta.json" in line


def test_shards_are_read_again_only_after_they_change(data, monkeypatch):
    import sllm.data.verify as verify

    checked = []
    real_check = verify._check
    monkeypatch.setattr(
        verify, "_check", lambda path, *a, **k: checked.append(path.name) or real_check(path, *a, **k)
    )
    meta = DataMeta.read(data)
    open_split(data, "train", meta)
    assert checked == ["train-00000.bin"] and (data / STAMP_FILE).is_file()
    open_split(data, "train", meta)
    assert checked == ["train-00000.bin"]
    shard = data / "train-00000.bin"
    shard.write_bytes(shard.read_bytes())  # rewritten: a new mtime
    open_split(data, "train", meta)
    assert checked == ["train-00000.bin"] * 2


def test_data_without_checksums_loads_and_verify_update_adds_them(capsys, data):
    meta = json.loads((data / META_FILE).read_text("utf-8"))
    recorded = meta.pop("checksums")
    (data / META_FILE).write_text(json.dumps(meta), "utf-8")
    open_split(data, "train", DataMeta.read(data))
    main(["data", "verify", str(data)])
    assert "3 lack a sha256 in meta.json: `--update` records it" in capsys.readouterr().out
    main(["data", "verify", "--update", str(data)])
    assert DataMeta.read(data).checksums == recorded
    main(["data", "verify", str(data)])
    assert capsys.readouterr().out.strip().endswith("token ids below 512, sha256)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (NOT_UTF8, "is damaged (not UTF-8 text)"),
        (b'{"stop": "</a>"}', "field stop should be a list, not a string"),
        (b'{"user": "{0}"}', "is not a usable chat template (Replacement index 0 out of range"),
    ],
    ids=["not-utf8", "wrong-type", "format-field"],
)
def test_a_damaged_chat_template_is_named(capsys, run, content, expected):
    (run / "chat_template.json").write_bytes(content)
    line = cli_error(capsys, "generate", "--run", run, "--prompt", "a")
    assert f"{run / 'chat_template.json'} " in line and expected in line


def test_an_sft_csv_with_a_very_long_cell_loads(tmp_path):
    from sllm.finetune.sft_data import load_sft

    data = tmp_path / "sft.csv"
    data.write_text("Q,A\nhi," + "x" * 200_000 + "\n", "utf-8")  # beyond csv's default field limit
    assert len(load_sft(data).conversations) == 1


def test_a_metrics_line_cut_inside_a_character_is_dropped(tmp_path):
    from sllm.report import read_metrics
    from sllm.train.monitor import _records_up_to

    metrics = tmp_path / "metrics.jsonl"
    whole = '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
    metrics.write_bytes(whole.encode() + '{"step": 3, "sample": "대'.encode()[:-1])  # killed mid-write
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    assert _records_up_to(metrics, 1) == '{"step": 1, "loss": 5.0}\n'
    metrics.write_text('{"step": "x"}\n' + NESTED + "\n" + whole, "utf-8")
    assert _records_up_to(metrics, 5) == whole


def test_a_damaged_plan_json_is_named(tmp_path, capsys, tokenizer):
    run = random_run(tmp_path / "run", tokenizer, "train.micro_batch=auto", "train.batch_size=8")
    (run / "plan.json").write_text('{"micro_batch": "many"}', "utf-8")
    line = cli_error(capsys, "info", "--run", run)
    assert f"{run / 'plan.json'} is damaged (no integer micro_batch)" in line


def test_text_where_a_metric_belongs_is_left_out_of_the_report(tmp_path, run, capsys):
    records = [
        {"step": "x", "loss": 1.0},
        {"step": 1, "loss": [5.0], "tokens": 64, "lr": "fast"},
        {"step": 2, "loss": 4.0, "tokens": 128, "val_loss": {"a": 1}, "tokens_per_s": 10.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    main(["report", str(run), "--out", str(tmp_path / "report")])
    from sllm.report import read_metrics

    assert read_metrics(run) == [
        {"step": 1, "tokens": 64},
        {"step": 2, "loss": 4.0, "tokens": 128, "tokens_per_s": 10.0},
    ]
    assert (tmp_path / "report" / "report.md").is_file()


def test_a_queue_file_that_is_not_utf8_is_named(tmp_path, capsys):
    queue = tmp_path / "queue.txt"
    queue.write_bytes(b"train --data d --out r\n" + NOT_UTF8)
    assert f"{queue} is damaged (not UTF-8 text)" in cli_error(capsys, "queue", queue)


def test_an_override_nested_too_deeply_or_over_a_section_that_is_no_mapping_is_one_line(tmp_path, capsys):
    deep = "[" * 5000 + "]" * 5000
    assert "override train.lr is nested too deeply" in cli_error(
        capsys, "info", "--config", "demo", f"train.lr={deep}"
    )
    config = tmp_path / "bad.yaml"
    config.write_text("data: x\n", "utf-8")
    assert "config section data must be a mapping" in cli_error(
        capsys, "info", "--config", config, "data.dir=d"
    )


def test_a_shard_that_cannot_be_read_is_one_line(capsys, data, monkeypatch):
    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("sllm.data.shards.np.memmap", unreadable)
    message = cli_error(capsys, "data", "verify", data)
    assert message == (
        f"sllm: error: cannot read {data / 'train-00000.bin'}: Permission denied; "
        "check its permissions or the disk"
    )
