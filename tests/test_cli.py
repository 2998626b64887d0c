"""The CLI end to end in subprocesses: the issue's commands, and bad input → one line, exit 2
(mostly in this process: the same `main`, without starting Python and torch each time)."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

from sllm.cli import main

from .conftest import constitution_paragraphs, random_run, write_jsonl


def sllm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sllm", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def sllm_inline(*args, cwd=None) -> subprocess.CompletedProcess:
    """`sllm` run in this process through the same `main`, for bad input refused before any work:
    a second interpreter would spend two seconds importing torch to print one line."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.chdir(cwd or "."), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sllm: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_the_documented_workflow_runs_end_to_end(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", constitution_paragraphs())
    tiny = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
    tiny += ["train.micro_batch=4", "train.eval_interval=10", "train.checkpoint_interval=10"]
    tiny += ["log.progress=false", "train.device=cpu"]
    result = sllm("tokenizer", "train", "--input", corpus, "--vocab-size", 400, "--out", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()

    result = sllm(
        "prepare",
        "--input",
        corpus,
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "data",
        "--val-ratio",
        0.1,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] == 400

    train = [
        "train",
        "--config",
        "demo",
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "run",
        "train.max_steps=20",
        *tiny,
    ]
    result = sllm(*train)
    assert result.returncode == 0, result.stderr
    assert "val loss" in result.stdout
    again = sllm(*train)
    assert again.returncode == 0 and "already finished" in again.stdout

    result = sllm("eval", "--run", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == ["split", "tokens", "loss", "perplexity", "bits/byte", "top-1", "top-5",
                              "bpb", "ko", "bpb", "en", "bpb", "other"]  # fmt: skip
    assert row.split()[0] == "val" and float(row.split()[3]) > 1

    result = sllm("generate", "--run", tmp_path / "run", "--prompt", "대한민국은", "--max-new-tokens", 10,
                  "--temperature", 0.8, "--top-k", 50, "--top-p", 0.95, "--seed", 3)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("대한민국은") and len(result.stdout.strip()) > len("대한민국은")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "train.lrr=1"], ["unknown config key train.lrr", "valid keys of train", "lr"]),
        (["train", "model.n_layer=abc"], ["model.n_layer must be of type int"]),
        (["train", "model.n_embd=100", "model.n_head=6"], ["divisible by model.n_head"]),
        (
            ["train", "model.block_size=64", "train.block_size=128"],
            ["larger than the model context"],
        ),
        (["train", "train.device=tpu"], ["allowed values: auto, cpu, cuda, mps"]),
        (["train", "--config", "missing.yaml"], ["config file missing.yaml not found"]),
        (["train", "--data", "no/such/dir"], ["not a prepared data directory"]),
        (
            ["prepare", "--input", "no_such_file.jsonl", "--out", "x"],
            ["input file no_such_file.jsonl not found"],
        ),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        (
            ["generate", "--run", "no/run", "--prompt", "x", "--top-p", "1.5"],
            ["top_p must be in (0, 1]"],
        ),
        (["generate", "--run", "no/run", "--prompt", "x"], ["run directory no/run does not exist"]),
        (["eval", "--run", "no/run"], ["run directory no/run does not exist"]),
        (["eval", "--run", "."], ["is not a run directory (no config.yaml)"]),
        (["train", "--config", "."], ["config file . is a directory"]),
        (
            ["generate", "--run", "no/run", "--prompt", "x", "--temperature", "nan"],
            ["temperature must be a finite"],
        ),
        (["generate", "--run", "no/run", "--prompt", "x", "--device", "tpu"], ["unknown device 'tpu'"]),
        (["eval", "--run", "no/run", "--batch-size", "-1"], ["--batch-size: -1 is out of range"]),
        (["eval", "--run", "no/run", "--text", "a.txt", "--data", "d"], ["--data gives prepared data"]),
        (["bench", "generate", "--run", "no/run", "--new-tokens", "1"], ["--new-tokens: 1 is out of range"]),
        (["serve", "--run", "no/run", "--port", "70000"], ["--port: 70000 is out of range"]),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, args, fragments):
    assert_one_line_error(sllm_inline(*args, cwd=tmp_path), *fragments)


def test_bad_input_gives_one_line_from_a_real_process_too(tmp_path):
    assert_one_line_error(sllm("train", "train.lrr=1", cwd=tmp_path), "unknown config key train.lrr")


def test_overrides_may_follow_the_options_and_keep_their_order(tmp_path):
    before = sllm(
        "info", "--config", "demo", "model.n_embd=32", "model.vocab_size=1000", "--micro-batch", "2"
    )
    after = sllm("info", "--config", "demo", "model.n_embd=64", "--micro-batch", "2", "model.vocab_size=1000",
                 "train.beta1=0.8", "model.n_embd=32")  # fmt: skip
    assert before.returncode == after.returncode == 0, after.stderr
    assert after.stdout == before.stdout and "gpt model" in after.stdout
    assert_one_line_error(
        sllm("info", "--config", "demo", "--micro-batch", "2", "--dta", "x"), "unrecognized"
    )


def test_malformed_jsonl_names_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": \n', "utf-8")
    result = sllm("prepare", "--input", corpus, "--out", tmp_path / "d")
    assert_one_line_error(result, "bad.jsonl:2: malformed JSON")
    assert not (tmp_path / "d").exists()


def test_every_command_has_help():
    for command in (
        ["demo"],
        ["tokenizer", "train"],
        ["prepare"],
        ["train"],
        ["eval"],
        ["generate"],
    ):
        result = sllm(*command, "--help")
        assert result.returncode == 0 and "usage: sllm" in result.stdout


def test_bad_input_files_give_one_line(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert_one_line_error(
        sllm("prepare", "--input", tmp_path / "binary.txt", "--out", tmp_path / "d"), "binary"
    )
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    result = sllm("prepare", "--input", tmp_path / "latin1.txt", "--out", tmp_path / "d")
    assert_one_line_error(result, "latin1.txt: invalid UTF-8 at byte 3 (line 1)")
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_line_error(
        sllm("prepare", "--input", tmp_path / "empty.jsonl", "--out", tmp_path / "d"), "empty"
    )
    assert not (tmp_path / "d").exists()
    corpus = write_jsonl(tmp_path / "ok.jsonl", constitution_paragraphs()[:50])
    result = sllm("prepare", "--input", corpus, "--out", "/proc/sllm-test/data")
    assert_one_line_error(result, "cannot write the prepared data to /proc/sllm-test")


def test_an_output_path_that_is_a_file_or_holds_a_tokenizer_is_one_line(tmp_path, trained_run):
    corpus = write_jsonl(tmp_path / "ok.jsonl", constitution_paragraphs()[:50])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    tokenizer = ["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out"]
    for command, fragment in [
        (["prepare", "--input", corpus, "--out", a_file], "exists and is not a prepared data directory"),
        (["export", "--run", trained_run, "--out", a_file / "hf"], "cannot write the export to"),
        (["import", "--hf", tmp_path, "--out", a_file / "run"], "cannot write the imported run to"),
        ([*tokenizer, a_file], "cannot write the tokenizer to"),
        ([*tokenizer, trained_run], "already holds a tokenizer.json"),
    ]:
        assert_one_line_error(sllm(*command), fragment)
    assert a_file.read_text() == "keep me"


def test_data_prepared_with_another_tokenizer_is_refused(tmp_path, trained_run, prepared_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:80])
    result = sllm("prepare", "--input", corpus, "--out", tmp_path / "other", "tokenizer.vocab_size=300")
    assert result.returncode == 0, result.stderr
    result = sllm("train", "--data", tmp_path / "other", "--out", trained_run, "train.device=cpu")
    assert_one_line_error(result, "was trained with another tokenizer")


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"]])
def test_sampling_flags_left_out_take_the_runs_sample_section(tmp_path, tokenizer, command):
    from sllm.cli import build_parser
    from sllm.commands import sampling_params

    run = random_run(
        tmp_path / "run", tokenizer, "sample.temperature=0.3", "sample.top_k=7",
        "sample.top_p=0.5", "sample.repetition_penalty=1.3",
    )  # fmt: skip
    parse = build_parser().parse_args
    taken = sampling_params(parse([*command, "--run", str(run)]))
    assert (taken.temperature, taken.top_k, taken.top_p, taken.repetition_penalty) == (0.3, 7, 0.5, 1.3)
    given = sampling_params(parse([*command, "--run", str(run), "--temperature", "0", "--top-k", "0"]))
    assert (given.temperature, given.top_k, given.top_p) == (0.0, 0, 0.5)


def test_flag_help_comes_from_the_declared_fields(capsys):
    """A shorthand flag shows its config field's help, default and range; a sampling flag its
    `SamplingParams` field's help and range, and that the run's `sample` section fills it."""
    from sllm.cli import build_parser
    from sllm.config import DataConfig

    def help_of(*command):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    val_ratio = (
        f"share of documents held out for validation (data.val_ratio; default: {DataConfig().val_ratio}"
    )
    assert f"--val-ratio VAL_RATIO {val_ratio}; range: [0, 1))" in help_of("prepare")
    generate = help_of("generate")
    assert "1 disables (default: the run's sample.top_p; range: (0, 1])" in generate
    assert "most tokens generated per prompt (default: 100; range: >= 0)" in generate
    assert "(default: 200;" in help_of("chat")
