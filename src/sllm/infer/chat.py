"""Multi-turn chat in the terminal (`sllm chat`), and the chat template both chat and serve use.

A `ChatTemplate` turns a list of messages into the model's prompt text. A base model gets
plain continuation (`PLAIN`): the conversation is one growing document, each user message
is continued directly by the model. An instruction-tuned run can ship `chat_template.json`
(the fields of `ChatTemplate`) next to its config; `load_chat_template` picks it up, which is
the hook for SFT. The history is kept within the context: the oldest turns are dropped (with
a notice) until the prompt leaves room for the reply.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sllm.errors import UserError
from sllm.infer.engine import TextGenerator
from sllm.infer.sampling import SamplingParams

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """Format strings per role (`{text}` is the message); `reply_prefix` opens the model's turn."""

    system: str = "{text}\n"
    user: str = "{text}"
    assistant: str = "{text}\n"
    reply_prefix: str = ""
    stop: tuple[str, ...] = field(default=())

    def render(self, messages: list[Message]) -> str:
        """The prompt for the model's next reply."""
        parts = [getattr(self, message.role).format(text=message.content) for message in messages]
        return "".join(parts) + self.reply_prefix


PLAIN = ChatTemplate()


def save_chat_template(run_dir: str | Path, template: ChatTemplate) -> None:
    """Ship a template with a run so `sllm chat` and `sllm generate` format prompts with it."""
    fields = {**dataclasses.asdict(template), "stop": list(template.stop)}
    (Path(run_dir) / TEMPLATE_FILE).write_text(json.dumps(fields, ensure_ascii=False, indent=2), "utf-8")


def load_chat_template(run_dir: str | Path) -> ChatTemplate:
    """The run's `chat_template.json` if it has one, else plain continuation."""
    path = Path(run_dir) / TEMPLATE_FILE
    if not path.is_file():
        return PLAIN
    fields = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(ChatTemplate)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise UserError(f"{path} must be a JSON object with keys among {sorted(known)}")
    return ChatTemplate(**{**fields, "stop": tuple(fields.get("stop", ()))})


def reply_reserve(generator: TextGenerator, params: SamplingParams) -> int:
    """Context tokens kept free for the reply: max_new_tokens, at most half the context."""
    return min(params.max_new_tokens, generator.context_tokens // 2)


def fit_history(
    messages: list[Message], template: ChatTemplate, generator: TextGenerator, params: SamplingParams
) -> tuple[list[Message], int]:
    """The newest messages whose prompt fits the context with room for the reply, and how
    many were dropped. System messages are kept; the last message always is."""
    budget = generator.context_tokens - reply_reserve(generator, params)
    kept = list(messages)
    dropped = 0
    while len(kept) > 1 and len(generator.tokenizer.encode(template.render(kept))) > budget:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m.role != "system"), None)
        if oldest is None:
            break
        del kept[oldest]
        dropped += 1
    return kept, dropped


SETTABLE: dict[str, Callable[[str], object]] = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "max_new_tokens": int,
    "seed": int,
}
HELP = "commands: /reset (forget the conversation), /exit, /set NAME VALUE (" + ", ".join(SETTABLE) + ")"


def parse_setting(params: SamplingParams, argument: str) -> SamplingParams:
    """`/set temperature 0.7` → new params; a bad name or value is a UserError."""
    name, _, value = argument.strip().partition(" ")
    if name not in SETTABLE or not value.strip():
        raise UserError(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}")
    try:
        parsed = SETTABLE[name](value.strip())
    except ValueError:
        raise UserError(f"{value.strip()!r} is not a valid value for {name}") from None
    return dataclasses.replace(params, **{name: parsed})


class ChatSession:
    """The conversation state and what each input line does to it."""

    def __init__(
        self, generator: TextGenerator, template: ChatTemplate, params: SamplingParams, out: TextIO
    ) -> None:
        self.generator = generator
        self.template = template
        self.params = params
        self.out = out
        self.messages: list[Message] = []

    def handle(self, line: str) -> bool:
        """Act on one input line; False means the user asked to leave."""
        command, _, argument = line.partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.messages = []
            self.say("(conversation cleared)")
        elif command == "/set":
            try:
                self.params = parse_setting(self.params, argument)
                self.say(f"({argument.split()[0]} = {getattr(self.params, argument.split()[0])})")
            except UserError as error:
                self.say(f"error: {error}")
        elif command.startswith("/"):
            self.say(HELP)
        elif line:
            self.reply(line)
        return True

    def reply(self, text: str) -> None:
        """Stream the model's answer to `text` and remember both."""
        self.messages.append(Message("user", text))
        self.messages, dropped = fit_history(self.messages, self.template, self.generator, self.params)
        if dropped:
            self.say(f"(dropped the {dropped} oldest messages to fit the context)")
        params = dataclasses.replace(self.params, stop=self.params.stop + self.template.stop)
        pieces = []
        for _, piece in self.generator.stream_batch([self.template.render(self.messages)], params):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.messages.append(Message("assistant", "".join(pieces)))

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def run_chat(session: ChatSession, lines: TextIO) -> None:
    """Read lines until /exit or end of input."""
    session.say(f"chatting with the model ({session.generator.context_tokens} tokens of context); {HELP}")
    while True:
        session.out.write("> ")
        session.out.flush()
        line = lines.readline()
        if not line or not session.handle(line.strip()):
            session.out.write("\n")
            return
