"""Instruction data as conversations: Alpaca JSON/JSONL, chat JSONL and question/answer CSV.

Alpaca (`instruction`, optional `input`, `output`) becomes a user and an assistant turn, chat
(`messages: [{role, content}]`) stays as is, a CSV's question and answer columns become the
two turns. Structural problems stop with one `UserError` naming the line or record; examples
with an empty answer are skipped and counted in the summary.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from sllm.data.sources import CSV_FIELD_LIMIT, read_text_file
from sllm.errors import UserError
from sllm.files import loads_json
from sllm.infer.chat_template import Message

ROLES = ("system", "user", "assistant")
QUESTION_COLUMNS = ("Q", "question", "instruction", "prompt")
ANSWER_COLUMNS = ("A", "answer", "output", "response")


@dataclass
class SftData:
    path: Path
    conversations: list[list[Message]]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {len(self.conversations):,} conversations"
        if self.skipped:
            text += f", skipped {len(self.skipped):,} without an answer (first: {self.skipped[0]})"
        return text


def load_sft(path: str | Path) -> SftData:
    path = Path(path)
    text = read_text_file(path, "SFT file", "a .json, .jsonl or .csv file")
    readers = {".csv": _csv_records, ".jsonl": _jsonl_records, ".json": _json_records}
    if path.suffix.lower() not in readers:
        raise UserError(f"SFT file {path} must end in .json, .jsonl or .csv")
    records = readers[path.suffix.lower()](path, text)
    data = SftData(path, [])
    for where, record in records:
        conversation = _conversation(path, where, record)
        if any(m.role == "assistant" and m.content.strip() for m in conversation):
            data.conversations.append(conversation)
        else:
            data.skipped.append(where)
    if not data.conversations:
        raise UserError(f"SFT file {path} has no example with an assistant answer; check the file")
    return data


def _json_records(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        records = loads_json(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"SFT file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise UserError(f"SFT file {path} must hold a JSON array of examples (or use .jsonl)")
    return [(f"record {number}", record) for number, record in enumerate(records)]


def _jsonl_records(path: Path, text: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", loads_json(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); fix that line") from None
    return records


def _csv_records(path: Path, text: str) -> list[tuple[str, object]]:
    csv.field_size_limit(CSV_FIELD_LIMIT)  # a long answer in one cell is no damage
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    header = list(rows[0]) if rows else []
    question = next((c for c in QUESTION_COLUMNS if c in header), None)
    answer = next((c for c in ANSWER_COLUMNS if c in header), None)
    if question is None or answer is None:
        raise UserError(
            f"{path} needs a question column ({', '.join(QUESTION_COLUMNS)}) and an answer column "
            f"({', '.join(ANSWER_COLUMNS)}) in its header"
        )
    return [
        (f"line {number}", {"instruction": row[question] or "", "output": row[answer] or ""})
        for number, row in enumerate(rows, start=2)
    ]


def _conversation(path: Path, where: str, record: object) -> list[Message]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return [_message(path, where, m) for m in record["messages"]]
    if isinstance(record, dict) and isinstance(record.get("instruction"), str):
        prompt = record["instruction"]
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt += "\n\n" + extra
        output = record.get("output")
        return [Message("user", prompt), Message("assistant", output if isinstance(output, str) else "")]
    raise UserError(
        f"{path} {where} is neither Alpaca (instruction, input, output) nor chat (messages); fix it"
    )


def _message(path: Path, where: str, message: object) -> Message:
    if (
        not isinstance(message, dict)
        or message.get("role") not in ROLES
        or not isinstance(message.get("content"), str)
    ):
        raise UserError(f"{path} {where}: each message needs a role ({', '.join(ROLES)}) and text content")
    return Message(message["role"], message["content"])
