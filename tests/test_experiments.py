"""`sllm queue` and `sllm report` end to end."""

import json
import warnings

import pytest
import yaml

from sllm import report as report_module
from sllm.cli import main
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
        f"# a run that fails once it sees the data, then a run\n"
        f"--data {prepared_dir} --out {tmp_path}/a model.vocab_size=10 {TINY}  # fails\n"
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


def test_queue_checks_every_line_first_and_runs_nothing_when_any_is_bad(tmp_path, prepared_dir, capsys):
    (tmp_path / "unprepared").mkdir()
    (tmp_path / "taken").write_text("a file")
    qa = tmp_path / "qa.csv"
    qa.write_text("Q,A\n대한민국은?,민주공화국이다\n", "utf-8")
    data, a = f"--data {prepared_dir}", tmp_path / "a"
    queue = tmp_path / "q.txt"
    queue.write_text(
        f"{data} --out {a} train.max_steps=10 {TINY}\n"
        f"{data} --out {tmp_path}/b train.max_stepz=10 {TINY}\n"
        f"--data {tmp_path}/nowhere --out {tmp_path}/c {TINY}\n"
        f"--data {tmp_path}/unprepared --out {tmp_path}/d {TINY}\n"
        f"{data} --out {a} {TINY}\n"
        f"{data} --out {tmp_path}/taken/e {TINY}\n"
        f"finetune sft --run {a} --data {tmp_path}/missing.csv --out {tmp_path}/f sft.epochs=1\n"
        f"finetune sft --run {a} --data {qa} --out {tmp_path}/g sft.epoch=1\n"
        f"finetune sts --run {tmp_path}/norun --train {qa} --dev {qa} --out {tmp_path}/h\n"
        f"{tmp_path}/stories.yaml\n"
        f"--dta {prepared_dir}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["queue", str(queue)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(
        f"sllm: error: {queue} has 10 bad lines, so nothing ran; fix them and run again: "
    )
    problems = stderr.rstrip("\n").split("; fix them and run again: ")[1].split(" | ")
    expected = [
        "line 2: unknown config key train.max_stepz; valid keys of train: out_dir, max_steps,",
        f"line 3: {tmp_path}/nowhere is not a prepared data directory (no meta.json); run `sllm prepare`",
        f"line 4: {tmp_path}/unprepared is not a prepared data directory (no meta.json)",
        f"line 5: run directory {a} is also line 1's; give each its own",
        f"line 6: run directory {tmp_path}/taken/e: {tmp_path}/taken is not a writable directory;",
        f"line 7: --data {tmp_path}/missing.csv is not a file",
        "line 8: unknown config key sft.epoch; valid keys of sft:",
        f"line 9: run directory {tmp_path}/norun does not exist; check --run",
        f"line 10: config file {tmp_path}/stories.yaml not found; give a YAML path or a preset",
        "line 11: unrecognized arguments: --dta",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem
    assert not a.exists() and not (tmp_path / "q.txt.status.json").exists()


def test_a_queue_line_may_be_a_config_file_and_a_fine_tuning_may_start_from_a_run_of_an_earlier_line(
    tmp_path, prepared_dir
):
    from sllm.cli import build_parser
    from sllm.queue import check_queue, read_queue

    settings = dict(item.split("=") for item in TINY.split())
    sections: dict = {}
    for key, value in {
        **settings,
        "data.dir": str(prepared_dir),
        "train.out_dir": str(tmp_path / "runs/s"),
    }.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    (tmp_path / "stories.yaml").write_text(yaml.safe_dump({"base": "demo", **sections}), "utf-8")
    qa = tmp_path / "qa.csv"
    qa.write_text("Q,A\n대한민국은?,민주공화국이다\n", "utf-8")
    queue = tmp_path / "q.txt"
    queue.write_text(
        f"{tmp_path}/stories.yaml train.max_steps=4\n"
        f"{tmp_path}/stories.yaml train.out_dir={tmp_path}/runs/t train.init_from={tmp_path}/runs/s\n"
        f"finetune sft --run {tmp_path}/runs/s --data {qa} --out {tmp_path}/runs/sft\n"
    )
    parse = build_parser().parse_args(["queue", str(queue)]).parse_line
    check_queue(queue, read_queue(queue), parse)  # the runs the later lines start from come first

    queue.write_text(f"{tmp_path}/stories.yaml train.max_steps=4\n")
    result = sllm("queue", queue)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "runs/s/config.yaml").read_text(encoding="utf-8"))
    assert (
        saved["data"]["dir"] == str(prepared_dir) and saved["train"]["max_steps"] == 4 and "base" not in saved
    )
    assert saved["data"]["txt_mode"] == "paragraph"  # from the demo preset, its base


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
