import re

import pytest

from sllm.demo import run_demo


def _run(tmp_path, capsys, overrides):
    result = run_demo(
        ["log.progress=false", *overrides],
        data_dir=str(tmp_path / "data"),
        run_dir=str(tmp_path / "run"),
    )
    return result, capsys.readouterr().out


def test_demo_runs_end_to_end_with_few_steps(tmp_path, capsys):
    result, out = _run(tmp_path, capsys, ["train.max_steps=60", "train.eval_interval=30", "model.n_layer=2"])
    assert result["val_perplexity"] < result["unigram_perplexity"]
    assert re.search(r"validation perplexity [\d.]+ \(unigram baseline [\d.]+\)", out)
    assert out.count("\n[") == 3  # three prompts continued
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == "step-000060"


@pytest.mark.slow
def test_full_demo_beats_unigram_baseline_clearly(tmp_path, capsys):
    result, _ = _run(tmp_path, capsys, [])
    assert result["val_perplexity"] < result["unigram_perplexity"] / 10
