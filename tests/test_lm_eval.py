"""lm-evaluation-harness on an sllm HF export: the shipped task YAMLs (examples/lm_eval) run
through the real `lm_eval` package, which scores a multiple-choice file exactly as
`sllm eval --mc` does, and builds its KorSTS, KLUE-STS and NSMC tasks from ../shared/data."""

import csv
import glob
import json
from pathlib import Path

import pytest
import torch

from sllm.export import export_run
from sllm.multiple_choice import choice_logliks, evaluate_multiple_choice, read_questions
from sllm.run import open_run

from .conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "examples" / "lm_eval"


@pytest.fixture
def task_manager(monkeypatch):
    """The shipped tasks alone (indexing the harness's own thousands takes half a minute), with
    their data paths read from the repository root, as documented."""
    pytest.importorskip("lm_eval")  # here, not at collection: importing it takes seconds
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def test_harness_scores_the_sllm_mc_task_as_sllm_eval_mc(trained_run, tmp_path, task_manager):
    from lm_eval.evaluator import simple_evaluate

    exported = export_run(trained_run, tmp_path / "hf")
    output = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(exported), "dtype": "float32"},
        tasks=["sllm_mc"],
        task_manager=task_manager,
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    ours = evaluate_multiple_choice(trained_run, REPO / "examples/mc_ko.jsonl", device="cpu")
    theirs = output["results"]["sllm_mc"]
    assert (theirs["acc,none"], theirs["acc_bytes,none"]) == (ours.accuracy, ours.accuracy_norm)
    cpu = torch.device("cpu")
    run = open_run(trained_run, cpu)
    questions = read_questions(REPO / "examples/mc_ko.jsonl")
    samples = sorted(output["samples"]["sllm_mc"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(questions) == 12
    for sample, question in zip(samples, questions, strict=True):
        ours_logliks = [loglik for loglik, _ in choice_logliks(run.model, run.tokenizer, question, cpu)]
        theirs_logliks = [float(response[0]) for response in sample["filtered_resps"]]
        assert theirs_logliks == pytest.approx(ours_logliks, abs=1e-4)


def _korsts_clear_pairs() -> list[int]:
    with open(SHARED_DATA / "korsts/sts-dev.tsv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [int(float(row["score"]) >= 4.0) for row in rows if not 1.0 < float(row["score"]) < 4.0]


def _klue_labels() -> list[int]:
    records = json.loads((SHARED_DATA / "klue_sts/klue-sts-v1.1_dev.json").read_text(encoding="utf-8"))
    return [record["labels"]["binary-label"] for record in records]


def _nsmc_labels() -> list[int]:
    files = sorted(glob.glob(str(SHARED_DATA / "nsmc/raw/1?????.json")))
    reviews = [review for file in files for review in json.loads(Path(file).read_text(encoding="utf-8"))]
    return [
        int(int(r["rating"]) >= 9) for r in reviews if not 5 <= int(r["rating"]) <= 8 and r["review"].strip()
    ]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize(
    ("task", "labels"),
    [("korsts_mc", _korsts_clear_pairs), ("klue_sts_mc", _klue_labels),
     pytest.param("nsmc_mc", _nsmc_labels, marks=pytest.mark.slow)],  # reads 1,296 files
)  # fmt: skip
def test_shipped_korean_tasks_build_their_documents_from_shared_data(task_manager, task, labels):
    harness_task = task_manager.load([task])["tasks"][task]
    docs = list(harness_task.test_docs())
    expected = labels()
    assert [harness_task.doc_to_target(doc) for doc in docs] == expected
    assert 0 < sum(expected) < len(expected)  # both answers occur
    context = harness_task.doc_to_text(docs[0])
    assert context.startswith("<|endoftext|>") and len(context) > 20
    assert harness_task.doc_to_choice(docs[0]) in ([" 아니오", " 예"], [" 부정", " 긍정"])
