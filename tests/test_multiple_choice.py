"""Multiple-choice log-likelihood scoring on a model whose probabilities we set by hand."""

import json
import math

import pytest
import torch
from torch import nn

from sllm.errors import UserError
from sllm.multiple_choice import Question, choice_logliks, read_questions, score_questions
from sllm.tokenizer import CharTokenizer

from .test_cli import assert_one_line_error, sllm

TOKENIZER = CharTokenizer(["<|endoftext|>"], [" ", "a", "b", "가"])
EOS, SPACE, A, B, GA = 0, 2, 3, 4, 5  # 1 is <|unk|>


class Bigram(nn.Module):
    """Next-token probabilities depend only on the current token: table[current, next]."""

    block_size = 8

    def __init__(self, table: dict[tuple[int, int], float]) -> None:
        super().__init__()
        probabilities = torch.full((TOKENIZER.vocab_size, TOKENIZER.vocab_size), 1e-3)
        for (current, following), p in table.items():
            probabilities[current, following] = p
        self.log_probs = (probabilities / probabilities.sum(-1, keepdim=True)).log()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.size(1) <= self.block_size, "longer than the context"
        return self.log_probs[idx]


MODEL = Bigram(
    {(EOS, GA): 1.0, (GA, SPACE): 0.5, (GA, B): 0.5, (SPACE, A): 0.5, (SPACE, B): 0.5}
    | {(A, B): 0.9, (A, A): 0.1, (B, B): 0.5, (B, EOS): 0.5}
)
CPU = torch.device("cpu")


def test_choice_logliks_are_the_summed_log_probabilities_of_the_choice_tokens():
    scores = choice_logliks(MODEL, TOKENIZER, Question("가", [" ab", " a"], 0), CPU)
    log_p = MODEL.log_probs
    assert log_p[A, B].exp() == pytest.approx(0.9, rel=1e-2)
    expected_ab = float(log_p[GA, SPACE] + log_p[SPACE, A] + log_p[A, B])
    assert scores[0] == (pytest.approx(expected_ab, rel=1e-5), 3)
    assert scores[1] == (pytest.approx(float(log_p[GA, SPACE] + log_p[SPACE, A]), rel=1e-5), 2)


def test_trailing_context_whitespace_is_scored_with_the_choice():
    moved = choice_logliks(MODEL, TOKENIZER, Question("가 ", ["ab", "a"], 0), CPU)
    assert moved == choice_logliks(MODEL, TOKENIZER, Question("가", [" ab", " a"], 0), CPU)


def test_normalized_accuracy_prefers_the_likelier_bytes_and_plain_accuracy_the_likelier_sum():
    # " ab" (ln .5 + ln .5 + ln .9 over 3 bytes) has a lower sum than " a" (ln .5 + ln .5 over 2)
    # but a higher log-likelihood per byte; " bb" (ln .5 three times) loses on both counts.
    questions = [Question("가", [" ab", " a"], 0), Question("가", [" ab", " bb"], 0)]
    result = score_questions(MODEL, TOKENIZER, questions, CPU)
    assert (result.questions, result.accuracy, result.accuracy_norm) == (2, 0.5, 1.0)
    assert result.chance == 0.5


def test_a_context_longer_than_the_window_keeps_its_end():
    question = Question("가" + "b" * 20, ["b", "a"], 0)
    (score, _), _ = choice_logliks(MODEL, TOKENIZER, question, CPU)
    assert score == pytest.approx(math.log(0.5), rel=1e-2)


def test_the_trained_model_runs_on_the_korean_example_file(trained_run):
    result = sllm("eval", "--run", trained_run, "--mc", "examples/mc_ko.jsonl", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "12 questions, accuracy " in result.stdout
    assert "(chance 0.2500)" in result.stdout


def test_answers_may_name_the_right_choice(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"context": "가", "choices": ["a", "b"], "answer": "b"}) + "\n\n")
    assert read_questions(path) == [Question("가", ["a", "b"], 1)]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "is not a multiple-choice question"),
     ('{"context": "x", "choices": ["a", "b"]}', "is not a multiple-choice question"),
     ('{"context": "x", "choices": ["a"], "answer": 0}', "at least two choices"),
     ('{"context": "x", "choices": ["a", "b"], "answer": 2}', "has answer 2"),
     ('{"context": "x", "choices": ["a", ""], "answer": 0}', "empty or non-text choice")],
)  # fmt: skip
def test_bad_question_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"context": "x", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as error:
        read_questions(path)
    assert f"{path}:2" in str(error.value)


def test_a_bad_file_is_one_line_on_the_command_line(trained_run, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"context": "x", "choices": ["a", "b"], "answer": 5}\n')
    assert_one_line_error(sllm("eval", "--run", trained_run, "--mc", path), f"{path}:1", "has answer 5")
