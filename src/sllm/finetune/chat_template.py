"""The chat template: role tokens around each message, loss weights on the answers only.

A conversation renders as `<|user|>question<|end|><|assistant|>answer<|end|>…`, each
message encoded on its own so the token boundaries (and so the mask) are exact. The
weights mark which tokens are training targets: the assistant's text and its `<|end|>`
(so the model learns to stop), never the prompt or the role tokens.

A base tokenizer that lacks the template tokens gets them as special tokens (BPE only:
they are appended, so every existing id keeps its meaning), and the model gets one new
embedding row per token, initialized to the mean of the existing rows.
"""

from __future__ import annotations

import torch
from torch import nn

from sllm.errors import UserError
from sllm.infer.chat import ChatTemplate, Message
from sllm.tokenizer import BPETokenizer, Tokenizer

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
TEMPLATE_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
# The same format as text, for `sllm chat` / `sllm generate` on a fine-tuned run.
INFERENCE_TEMPLATE = ChatTemplate(
    **{role: f"{token}{{text}}{END_TOKEN}" for role, token in ROLE_TOKENS.items()},
    reply_prefix=ROLE_TOKENS["assistant"],
    stop=(END_TOKEN,),
)


def with_template_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer itself when it knows the template tokens, else a copy that does."""
    missing = [t for t in TEMPLATE_TOKENS if tokenizer.token_id(t) is None]
    if not missing:
        return tokenizer
    if not isinstance(tokenizer, BPETokenizer):
        raise UserError(
            "SFT needs a BPE tokenizer to add the chat tokens to; pre-train with tokenizer.kind=bpe"
        )
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(tokenizer.to_json())
    hf.add_special_tokens(missing)
    return BPETokenizer(hf)


def grow_embeddings(model: nn.Module, vocab_size: int) -> None:
    """Give the token embedding (and an untied `lm_head`) `vocab_size` rows; new rows start at the
    mean row. Padding rows (`model.vocab_pad_multiple`) are used before any are added."""
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
    """Token ids of the conversation and, per token, 1.0 where it is a training target."""
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
