import shutil
import subprocess
import sys

import pytest

from sllm.errors import UserError
from sllm.infer.bench import bench_generate, format_table, tokens_to_generate

from .test_cli import assert_one_line_error, sllm


def test_bench_generate_measures_every_batch_size(trained_run):
    rows = bench_generate(trained_run, "cpu", [1, 3], prompt_tokens=8)
    assert [r.batch for r in rows] == [1, 3]
    assert all(r.new_tokens == 24 for r in rows)  # the default takes what fits the 32-token context
    assert all(r.decode_tokens_per_s > 0 and r.first_token_ms > 0 and r.peak_memory_mib > 0 for r in rows)
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["batch", "prompt", "new"] and len(table) == 3


def test_bench_rejects_a_prompt_longer_than_the_context(trained_run):
    result = subprocess.run(
        [sys.executable, "-m", "sllm", "bench", "generate", "--run", str(trained_run),
         "--prompt-tokens", "40"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--prompt-tokens" in result.stderr


def test_new_tokens_are_given_ones_that_fit_or_the_default_cut_to_fit():
    assert tokens_to_generate(64, 16, 48) == 48
    assert tokens_to_generate(64, 16, None) == 48
    assert tokens_to_generate(1024, 16, None) == 128
    assert tokens_to_generate(64, 62, None) == 2
    for prompt, new, refusal in [
        (63, 10, "--prompt-tokens 63 + --new-tokens 10 exceed the run's context of 64 tokens"),
        (16, 49, "--prompt-tokens 16 + --new-tokens 49 exceed"),
        (63, None, "--prompt-tokens 63 leaves no room for 2 new tokens"),
        (16, 1, "--new-tokens 1 leaves no decode step to time"),
        (80, 2, "--prompt-tokens 80 + --new-tokens 2 exceed"),
        (0, None, "--prompt-tokens must be 1 or more"),
    ]:
        with pytest.raises(UserError, match=refusal.replace("+", r"\+")):
            tokens_to_generate(64, prompt, new)


def test_bench_refuses_new_tokens_past_the_context_before_loading_the_model(trained_run, tmp_path):
    config_only = tmp_path / "run"  # no weights: a refusal after loading would name those instead
    config_only.mkdir()
    shutil.copy(trained_run / "config.yaml", config_only)
    result = sllm("bench", "generate", "--run", config_only, "--prompt-tokens", 31, "--new-tokens", 10,
                  "--batch-sizes", 1, "--device", "cpu")  # fmt: skip
    assert_one_line_error(
        result,
        "--prompt-tokens 31 + --new-tokens 10 exceed the run's context of 32 tokens; lower one of them",
    )
    assert result.stdout == ""
