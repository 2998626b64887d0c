"""The chat template: how a conversation becomes the model's text, for SFT, chat, serve and export.

A base model gets `PLAIN` (one growing document); an SFT run ships `SFT_TEMPLATE`
(`<|user|>question<|end|><|assistant|>answer<|end|>`) as `chat_template.json`. `render`
encodes each message on its own so the loss mask is exact (targets: the assistant's text and
its `<|end|>`). A BPE tokenizer lacking these tokens gets them appended, the model a new
embedding row each at the mean row. `to_jinja` writes HF's `apply_chat_template` Jinja.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sllm.atomic import write_text_atomic
from sllm.errors import UserError
from sllm.files import FieldError, read_json, typed
from sllm.tokenizer import HFBackedTokenizer, Tokenizer

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

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
TEMPLATE_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
# What SFT trains on, as text: the template an SFT run ships for chat, serve and export.
SFT_TEMPLATE = ChatTemplate(
    **{role: f"{token}{{text}}{END_TOKEN}" for role, token in ROLE_TOKENS.items()},
    reply_prefix=ROLE_TOKENS["assistant"],
    stop=(END_TOKEN,),
)


def save_chat_template(run_dir: str | Path, template: ChatTemplate) -> None:
    """Ship a template with a run so `sllm chat`, `generate`, `serve` and `export` use it."""
    fields = {**dataclasses.asdict(template), "stop": list(template.stop)}
    write_text_atomic(Path(run_dir) / TEMPLATE_FILE, json.dumps(fields, ensure_ascii=False, indent=2))


def load_chat_template(run_dir: str | Path) -> ChatTemplate:
    """The run's `chat_template.json` if it has one, else plain continuation."""
    path = Path(run_dir) / TEMPLATE_FILE
    if not path.is_file():
        return PLAIN
    fix = "restore it, or delete it for plain continuation"
    fields = read_json(path, fix)
    known = {f.name for f in dataclasses.fields(ChatTemplate)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise UserError(f"{path} must be a JSON object with keys among {sorted(known)}")
    try:
        template = typed(fields, ChatTemplate)
        template.render([Message(role, "") for role in ROLES])  # a format field other than {text}
    except (FieldError, LookupError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a usable chat template ({exc}); {fix}") from None
    return template


def to_jinja(template: ChatTemplate) -> str:
    """`template` as `apply_chat_template` Jinja, rendering exactly what `template.render` does."""
    pieces = {role: _literal_pieces(getattr(template, role)) for role in ROLES}
    unknown_role = json.dumps(f"sllm chat templates know the roles {', '.join(ROLES)} only")
    return (
        "{%- set pieces = " + json.dumps(pieces, ensure_ascii=False) + " -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in pieces -%}{{- raise_exception(" + unknown_role + ") -}}{%- endif -%}"
        "{{- pieces[message['role']] | join(message['content']) -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- " + json.dumps(template.reply_prefix, ensure_ascii=False) + " -}}"
        "{%- endif -%}"
    )


def _literal_pieces(format_string: str) -> list[str]:
    """The text around the `{text}` fields: the format filled with `content` is `content.join(pieces)`."""
    pieces = [""]
    for literal, name, spec, conversion in string.Formatter().parse(format_string):
        pieces[-1] += literal
        if name is None:
            continue
        if (name, spec, conversion) != ("text", "", None):
            raise UserError(
                f"the format {format_string!r} in the run's {TEMPLATE_FILE} has a field other than "
                "{text}, which the Hugging Face chat template cannot reproduce; use plain {text}"
            )
        pieces.append("")
    return pieces


def with_template_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer itself when it knows the template tokens, else a copy that does."""
    missing = [t for t in TEMPLATE_TOKENS if tokenizer.token_id(t) is None]
    if not missing:
        return tokenizer
    if not isinstance(tokenizer, HFBackedTokenizer):
        raise UserError(
            "SFT needs a BPE or word tokenizer to add the chat tokens to; pre-train with tokenizer.kind=bpe"
        )
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    hf.add_special_tokens(missing)
    grown = type(tokenizer)(hf)
    grown.pretokenize = tokenizer.pretokenize
    return grown


def grow_embeddings(model: nn.Module, vocab_size: int) -> None:
    """Give the embedding (and an untied `lm_head`) `vocab_size` rows, new ones at the mean row."""
    model.cfg.vocab_size = max(model.cfg.vocab_size, vocab_size)
    model.wte.weight = _grown(model.wte.weight, vocab_size)
    if hasattr(model, "lm_head"):
        model.lm_head.weight = _grown(model.lm_head.weight, vocab_size)


def _grown(weight: nn.Parameter, rows: int) -> nn.Parameter:
    old = weight.data
    if rows <= old.size(0):
        return weight
    new = torch.empty(rows, old.size(1), device=old.device, dtype=old.dtype)
    new[: old.size(0)] = old
    new[old.size(0) :] = old.mean(dim=0)
    return nn.Parameter(new)


def render(tokenizer: Tokenizer, conversation: list[Message]) -> tuple[list[int], list[float]]:
    """SFT's token ids of the conversation and, per token, 1.0 where it is a training target."""
    ids: list[int] = []
    weights: list[float] = []
    end = _id(tokenizer, END_TOKEN)
    texts = tokenizer.encode_batch([m.content for m in conversation])
    for message, text in zip(conversation, texts, strict=True):
        target = 1.0 if message.role == "assistant" else 0.0
        ids += [_id(tokenizer, ROLE_TOKENS[message.role]), *text, end]
        weights += [0.0] + [target] * (len(text) + 1)
    return ids, weights


def render_prompt(tokenizer: Tokenizer, conversation: list[Message]) -> list[int]:
    """The conversation so far, ending with the assistant role token: what generation continues."""
    ids, _ = render(tokenizer, conversation)
    return [*ids, _id(tokenizer, ROLE_TOKENS["assistant"])]


def _id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_id(token)
    if token_id is None:
        raise ValueError(f"{token} is not in the tokenizer; call with_template_tokens first")
    return token_id
