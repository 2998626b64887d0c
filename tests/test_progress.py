"""Progress bars: every long command draws one (count, rate, ETA) on a terminal's stderr, and
none with `--quiet` or when stderr is a pipe or a file."""

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from sllm.cli import main
from sllm.export import export_run

from .test_sts import write_sts_tsv

# tqdm's bar: "eval val: 100%|█████| 1.2k/1.2k [00:01<00:00, 900tokens/s]": done, elapsed<ETA
FINISHED_BAR = r"{}: 100%\|.*\| .* \[\d\d:\d\d<\d\d:\d\d"


class Terminal(io.StringIO):
    """A captured stderr that says it is a terminal, as tqdm asks before drawing."""

    def isatty(self) -> bool:
        return True


def run_cli(monkeypatch, *args, terminal: bool = True) -> str:
    """Run `sllm ARGS` in this process; what it wrote to stderr."""
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    main([*map(str, args)])
    return stderr.getvalue()


@pytest.fixture
def sft_file(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("Q,A\n" + "\n".join(["대한민국은?,민주공화국이다", "주권은?,국민에게 있다"] * 4), "utf-8")
    return data


def _mc_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    question = {"context": "대한민국은", "choices": [" 민주공화국이다", " 왕국이다"], "answer": 0}
    path.write_text(json.dumps(question, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _sts_files(tmp_path):
    return [write_sts_tsv(tmp_path / f"{name}.tsv", 12, seed) for seed, name in enumerate(("train", "dev"))]


# Per long command: its bar's label and its arguments, from (trained run, corpus, tmp_path, sft file)
COMMANDS = {
    "tokenizer train": ("tokenizer sample read; training", lambda run, corpus, tmp, sft: [
        "tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp / "tok"]),
    "eval": ("eval val", lambda run, corpus, tmp, sft: [
        "eval", "--run", run, "--split", "val", "--device", "cpu"]),
    "eval --mc": ("eval questions", lambda run, corpus, tmp, sft: [
        "eval", "--run", run, "--mc", _mc_file(tmp), "--device", "cpu"]),
    "finetune sft": ("sft", lambda run, corpus, tmp, sft: [
        "finetune", "sft", "--run", run, "--data", sft, "--out", tmp / "sft", "sft.epochs=1",
        "sft.batch_size=2", "sft.device=cpu", "sft.prompts=[]"]),
    "finetune sts": ("sts", lambda run, corpus, tmp, sft: [
        "finetune", "sts", "--run", run, "--train", _sts_files(tmp)[0], "--dev", tmp / "dev.tsv", "--out",
        tmp / "sts", "sts.epochs=1", "sts.batch_size=4", "sts.max_length=32", "sts.device=cpu"]),
    "bench generate": ("bench", lambda run, corpus, tmp, sft: [
        "bench", "generate", "--run", run, "--device", "cpu", "--batch-sizes", 1, 2, "--prompt-tokens", 4,
        "--new-tokens", 4]),
    "import": ("import", lambda run, corpus, tmp, sft: [
        "import", "--hf", export_run(run, tmp / "hf"), "--out", tmp / "imported"]),
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_long_commands_draw_a_bar_with_an_eta_on_a_terminal(
    command, trained_run, corpus_file, tmp_path, sft_file, monkeypatch
):
    label, arguments = COMMANDS[command]
    stderr = run_cli(monkeypatch, *arguments(trained_run, corpus_file, tmp_path, sft_file))
    assert re.search(FINISHED_BAR.format(re.escape(label)), stderr), stderr


@pytest.mark.parametrize("command", ["eval", "finetune sft"])
@pytest.mark.parametrize("quiet", [True, False])
def test_no_bar_with_quiet_or_without_a_terminal(
    command, quiet, trained_run, corpus_file, tmp_path, sft_file, monkeypatch
):
    arguments = COMMANDS[command][1](trained_run, corpus_file, tmp_path, sft_file)
    stderr = run_cli(monkeypatch, *arguments, *(["--quiet"] if quiet else []), terminal=quiet)
    assert "%|" not in stderr and "it/s" not in stderr


def test_export_check_draws_a_bar_of_its_steps(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    stderr = run_cli(monkeypatch, "export", "--run", trained_run, "--out", tmp_path / "hf", "--check")
    assert re.search(FINISHED_BAR.format("check export"), stderr), stderr
    assert "4/4" in stderr and "comparing logits" in stderr


def test_a_real_terminal_gets_the_bar(corpus_file, tmp_path):
    """Through a pseudo-terminal of 100 columns (tqdm draws nothing on one of 0 columns)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    args = ["tokenizer", "train", "--input", corpus_file, "--vocab-size", 300, "--out", tmp_path / "tok"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sllm", *map(str, args)], stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    drawn = b""
    while select.select([leader], [], [], 60)[0] and (chunk := _read(leader)):  # 60 s without output: hung
        drawn += chunk
    assert process.wait(timeout=60) == 0
    os.close(leader)
    assert re.search(FINISHED_BAR.format("tokenizer sample read; training"), drawn.decode()), drawn


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal closed with the process
        return b""
