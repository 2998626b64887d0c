"""Any checkpoint of a run, not only the newest: `latest`, `best`, `step-N`, `epoch-N` or the
checkpoint's directory, everywhere a run is opened, and one line listing what exists when the
name matches nothing."""

import pytest
import torch

from sllm.errors import UserError
from sllm.infer.engine import TextGenerator
from sllm.run import CHECKPOINTS, open_run, periodic_checkpoints

from .test_cli import assert_one_line_error, sllm


def _older(run_dir):
    newest, older, *_ = periodic_checkpoints(run_dir / CHECKPOINTS)
    return newest, older


def test_a_step_name_padded_or_not_and_a_path_open_that_checkpoint(trained_run):
    newest, older = _older(trained_run)
    step = int(older.name.split("-")[1])
    latest = open_run(trained_run, torch.device("cpu"))
    assert latest.checkpoint.path == newest
    for name in (older.name, f"step-{step}", str(older)):
        run = open_run(trained_run, torch.device("cpu"), name)
        assert run.checkpoint.path == older and run.checkpoint.meta.step == step
    weights = dict(run.model.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in latest.model.named_parameters())
    generator = TextGenerator.from_run(trained_run, "cpu", older.name)
    assert generator.generate("대한민국은", max_new_tokens=4, temperature=0) != ""


@pytest.mark.parametrize("name", ["step-999999", "epoch-3", "../../elsewhere", "nonsense"])
def test_a_name_that_matches_nothing_lists_what_the_run_holds(trained_run, name):
    newest, older = _older(trained_run)
    with pytest.raises(
        UserError, match=f"has no checkpoint '{name}'; it holds: .*{older.name}.*{newest.name}"
    ):
        open_run(trained_run, torch.device("cpu"), name)


def test_the_cli_takes_any_checkpoint_and_refuses_a_missing_one_in_one_line(trained_run):
    _, older = _older(trained_run)
    ok = sllm("eval", "--run", str(trained_run), "--checkpoint", older.name)
    assert ok.returncode == 0, ok.stderr
    missing = sllm("generate", "--run", str(trained_run), "--prompt", "a", "--checkpoint", "step-7")
    assert_one_line_error(missing, "has no checkpoint 'step-7'; it holds:")
