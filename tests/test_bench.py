import subprocess
import sys

from sllm.infer.bench import bench_generate, format_table


def test_bench_generate_measures_every_batch_size(trained_run):
    rows = bench_generate(trained_run, "cpu", [1, 3], prompt_tokens=8, new_tokens=100)
    assert [r.batch for r in rows] == [1, 3]
    assert all(r.new_tokens == 24 for r in rows)  # capped to the 32-token context
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
