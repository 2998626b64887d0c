"""Multiple-choice evaluation by log-likelihood, the method of lm-evaluation-harness.

Each JSONL line is `{"context": str, "choices": [str, ...], "answer": int or choice text}`.
A choice scores its tokens' summed log-probability after the context; `accuracy_norm` divides
by its UTF-8 bytes (our unit, as in bits per byte). As in the harness, whitespace ending the
context moves to the choice, whose tokens are those of encode(context + choice) after
len(encode(context)). The context follows an EOS and loses its oldest tokens to fit the window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from sllm.data.sources import read_text_file
from sllm.errors import UserError
from sllm.files import loads_json
from sllm.progress import progress_bar
from sllm.run import open_run
from sllm.runtime import select_device
from sllm.tokenizer import Tokenizer, nfc


@dataclass(frozen=True)
class Question:
    context: str
    choices: list[str]
    answer: int


@dataclass
class ChoiceResult:
    questions: int
    accuracy: float
    accuracy_norm: float
    chance: float  # expected accuracy of guessing uniformly


def read_questions(path: str | Path) -> list[Question]:
    """Parse and check a JSONL file of questions; a bad line stops with `file:line`."""
    path = Path(path)
    lines = read_text_file(path, "multiple-choice file", "a JSONL file of questions to --mc").split("\n")
    questions = [
        _parse_question(line, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()
    ]
    if not questions:
        raise UserError(f"{path} holds no questions; give one JSON object per line")
    return questions


def _parse_question(line: str, where: str) -> Question:
    expected = 'expected {"context": str, "choices": [str, ...], "answer": index or choice}'
    try:
        row = loads_json(line)
        context, choices, answer = row["context"], row["choices"], row["answer"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{where} is not a multiple-choice question; {expected}") from None
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where} needs a text context and at least two choices; {expected}")
    if not all(isinstance(choice, str) and choice for choice in choices):
        raise UserError(f"{where} has an empty or non-text choice; every choice must be text")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where} has answer {answer!r}; give an index below {len(choices)} or a choice")
    return Question(nfc(context), [nfc(choice) for choice in choices], answer)


def continuation_tokens(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int], str]:
    """Context tokens (after EOS), the choice's tokens and the choice text they cover."""
    moved = len(context) - len(context.rstrip())
    if moved:
        context, choice = context[:-moved], context[-moved:] + choice
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + choice)
    return [tokenizer.eos_id, *context_ids], whole[len(context_ids) :], choice


@torch.no_grad()
def choice_logliks(
    model: nn.Module, tokenizer: Tokenizer, question: Question, device: torch.device
) -> list[tuple[float, int]]:
    """(summed log-probability, UTF-8 bytes) of each choice, scored in one padded batch."""
    rows, spans, lengths = [], [], []
    for choice in question.choices:
        context_ids, choice_ids, text = continuation_tokens(tokenizer, question.context, choice)
        if not choice_ids or len(choice_ids) > model.block_size:
            raise UserError(
                f"choice {choice!r} has {len(choice_ids)} tokens of its own; it needs 1 to "
                f"{model.block_size} (the model's context)"
            )
        sequence = (context_ids + choice_ids)[-(model.block_size + 1) :]
        rows.append(sequence)
        spans.append(len(choice_ids))
        lengths.append(len(text.encode("utf-8")))
    inputs = pad_sequence([torch.tensor(row[:-1]) for row in rows], batch_first=True)
    targets = pad_sequence([torch.tensor(row[1:]) for row in rows], batch_first=True)
    log_probs = F.log_softmax(model(inputs.to(device)).float(), dim=-1)
    picked = log_probs.gather(-1, targets.to(device)[..., None])[..., 0].cpu()
    return [
        (float(picked[number, len(row) - 1 - span : len(row) - 1].sum()), length)
        for number, (row, span, length) in enumerate(zip(rows, spans, lengths, strict=True))
    ]


def score_questions(
    model: nn.Module, tokenizer: Tokenizer, questions: list[Question], device: torch.device
) -> ChoiceResult:
    correct = correct_norm = 0
    for question in progress_bar(questions, desc="eval questions", unit=" questions"):
        scores = choice_logliks(model, tokenizer, question, device)
        by_sum = max(range(len(scores)), key=lambda i: scores[i][0])
        by_byte = max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
        correct += by_sum == question.answer
        correct_norm += by_byte == question.answer
    total = len(questions)
    chance = sum(1 / len(q.choices) for q in questions) / total
    return ChoiceResult(total, correct / total, correct_norm / total, chance)


def evaluate_multiple_choice(
    run_dir: str | Path, path: str | Path, device: str = "auto", checkpoint: str = "latest"
) -> ChoiceResult:
    """Accuracy and byte-normalized accuracy of a run on a JSONL file of questions."""
    questions = read_questions(path)
    chosen = select_device(device)
    run = open_run(run_dir, chosen, checkpoint)
    return score_questions(run.model, run.tokenizer, questions, chosen)
