"""`sllm queue` and `sllm report` end to end."""

import json
import warnings

import pytest

from sllm import report as report_module
from sllm.report import NO_HANGUL_FONT_NOTE, hangul_font, write_report
from sllm.train.trainer import train

from .conftest import tiny_config
from .test_cli import sllm

TINY = (
    "model.n_layer=1 model.n_head=2 model.n_embd=32 model.block_size=16 train.micro_batch=4 "
    "train.eval_interval=5 train.checkpoint_interval=5 train.log_interval=2 "
    "log.progress=false train.device=cpu"
)


def test_queue_runs_lines_in_order_goes_on_after_a_failure_and_skips_finished_runs(tmp_path, prepared_dir):
    queue = tmp_path / "experiments.txt"
    queue.write_text(
        f"# a typo, then a run\n"
        f"--data {prepared_dir} --out {tmp_path}/a train.max_stepz=10 {TINY}  # fails\n"
        f"\n--data {prepared_dir} --out {tmp_path}/b train.max_steps=10 {TINY}\n"
    )
    result = sllm("queue", queue)
    assert result.returncode == 1  # one line failed
    status = json.loads((tmp_path / "experiments.txt.status.json").read_text())
    assert [(s["line"], s["status"]) for s in status] == [(2, "failed"), (4, "done")]
    table = result.stdout.splitlines()[-3:]
    assert table[0].split()[:2] == ["line", "status"] and "failed" in table[1] and "done" in table[2]

    again = sllm("queue", queue)
    status = json.loads((tmp_path / "experiments.txt.status.json").read_text())
    assert [s["status"] for s in status] == ["failed", "skipped: finished before"]
    assert again.returncode == 1


def test_empty_queue_is_a_user_error(tmp_path):
    queue = tmp_path / "q.txt"
    queue.write_text("# nothing\n\n")
    result = sllm("queue", queue)
    assert result.returncode == 2 and "lists no experiments" in result.stderr


def test_report_overlays_runs_and_lists_config_differences(tmp_path, prepared_dir):
    pytest.importorskip("matplotlib")
    for name, lr in (("a", "1e-2"), ("b", "3e-3")):
        cfg = tiny_config(
            prepared_dir, tmp_path / name, "train.max_steps=10", f"train.lr={lr}", "train.min_lr=0"
        )
        train(cfg, log=lambda _: None)
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report").read_text()
    assert "| train.lr | 0.01 | 0.003 |" in report
    assert "| a | 10 |" in report and "| b | 10 |" in report
    for name in ("loss", "val_loss", "lr", "tokens_per_s"):
        png = tmp_path / "report" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Last samples of b" in report
    result = sllm("report", tmp_path / "missing")
    assert result.returncode == 2 and "does not exist" in result.stderr


def _korean_named_run(root):
    run = root / "runs" / "my run 한글 폴더"
    run.mkdir(parents=True)
    lines = [
        {"step": s, "tokens": 64 * s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 900.0} for s in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_report_plots_fall_back_to_an_installed_hangul_font_only_inside_the_report(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(report_module, "_installed_font_families", lambda: {"DejaVu Sans", "NanumGothic"})
    assert hangul_font() == "NanumGothic"
    monkeypatch.setattr(
        report_module, "_installed_font_families", lambda: {"NanumGothic", "Noto Sans CJK JP", "DejaVu Sans"}
    )
    assert hangul_font() == "Noto Sans CJK JP"
    families = []
    draw = report_module._draw

    def recording_draw(*args):
        families.append(list(plt.rcParams["font.family"]))
        return draw(*args)

    monkeypatch.setattr(report_module, "_draw", recording_draw)
    default = list(plt.rcParams["font.family"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake font is not really there
        write_report([_korean_named_run(tmp_path)], tmp_path / "report")
    assert families == [[*default, "Noto Sans CJK JP"]]
    assert list(plt.rcParams["font.family"]) == default


def test_report_without_a_hangul_font_gives_one_note_instead_of_glyph_warnings(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(report_module, "_installed_font_families", lambda: {"DejaVu Sans"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report([_korean_named_run(tmp_path)], tmp_path / "report")
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert capsys.readouterr().err.splitlines() == [NO_HANGUL_FONT_NOTE]
    for name in ("loss", "lr", "tokens_per_s"):
        assert (tmp_path / "report" / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
