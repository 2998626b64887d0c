"""Multi-turn chat in the terminal (`sllm chat`), rendered with the run's chat template.

The oldest turns are dropped (with a notice) until the prompt leaves room for the reply;
`/set NAME VALUE` changes a sampling option mid-conversation.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TextIO

from sllm.errors import UserError
from sllm.infer.chat_template import ChatTemplate, Message
from sllm.infer.engine import TextGenerator, TextStream
from sllm.sampling import OPTION_TYPES, SamplingParams


def fit_history(
    messages: list[Message], template: ChatTemplate, generator: TextGenerator, params: SamplingParams
) -> tuple[list[Message], int]:
    """The newest messages that leave room for the reply (at most half the context), and how many
    were dropped; system messages and the last one are kept."""
    budget = generator.context_tokens - min(params.max_new_tokens, generator.context_tokens // 2)
    kept = list(messages)
    while len(kept) > 1 and len(generator.tokenizer.encode(template.render(kept))) > budget:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m.role != "system"), None)
        if oldest is None:
            break
        del kept[oldest]
    return kept, len(messages) - len(kept)


def note_if_ended_at_once(stream: TextStream, how: str) -> None:
    """A stderr note, with `how` to go on, when the first token ended the text (else: an empty reply)."""
    completion = stream.completions()[0]
    if completion.finish_reason == "stop" and not completion.text and not stream.tokens.params.min_new_tokens:
        note = f"the model ended its text at once (end-of-text first); {how} makes it write N tokens first"
        print(f"note: {note}", file=sys.stderr)


HELP = "commands: /reset (forget the conversation), /exit, /set NAME VALUE (" + ", ".join(OPTION_TYPES) + ")"


def parse_setting(params: SamplingParams, argument: str) -> SamplingParams:
    """`/set temperature 0.7` → new params; a bad name or value is a UserError."""
    name, _, value = argument.strip().partition(" ")
    if name not in OPTION_TYPES or not value.strip():
        raise UserError(f"usage: /set NAME VALUE with NAME one of {', '.join(OPTION_TYPES)}")
    try:
        parsed = OPTION_TYPES[name](value.strip())
    except ValueError:
        raise UserError(f"{value.strip()!r} is not a valid value for {name}") from None
    return dataclasses.replace(params, **{name: parsed})


@dataclass
class ChatSession:
    """The conversation state and what each input line does to it."""

    generator: TextGenerator
    template: ChatTemplate
    params: SamplingParams
    out: TextIO
    messages: list[Message] = field(default_factory=list)

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
        stream = self.generator.stream_batch([self.template.render(self.messages)], params)
        for _, piece in stream:
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        note_if_ended_at_once(stream, "/set min_new_tokens N (or --min-new-tokens N)")
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
