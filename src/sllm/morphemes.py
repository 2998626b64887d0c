"""Morpheme-aware pre-tokenization of Korean (`tokenizer.pretokenize: kiwi`).

Byte-level BPE merges inside the pieces its regex cuts, and a Korean word (a stem with its
particles and endings, 학교에서) is one piece, so plain BPE learns tokens across a morpheme
boundary. Here text is first cut at the boundaries the `kiwipiepy` analyzer finds, so no merge
crosses one. Cuts come from the analyzer's character offsets into the text itself, never from
its morpheme forms (갔다 is 가 + 었 + 다), so the pieces join back to exactly the text. Only a
boundary beside a Hangul character and not after whitespace is cut: elsewhere the byte-level
regex decides as before, and a text without Hangul never reaches the analyzer. HF `tokenizers`
cannot save a Python pre-tokenizer, so the cut runs in sllm's encode path and the tokenizer
file records it (see `sllm.tokenizer`).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from sllm.data.clean import SCRIPTS
from sllm.errors import UserError
from sllm.fast_bpe import threads

HANGUL = SCRIPTS["ko"]


@functools.cache
def _kiwi(workers: int) -> Any:
    """One analyzer per process and thread count: loading its model takes seconds."""
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise UserError(
            "tokenizer.pretokenize=kiwi needs the `kiwipiepy` package; pip install 'sllm[ko]'"
        ) from None
    return Kiwi(num_workers=workers)


def morpheme_pieces(texts: list[str]) -> list[list[str]]:
    """Each text cut at the morpheme boundaries beside Hangul; the pieces join to the text.
    The texts with Hangul are analyzed in one call, on the encoding threads."""
    pieces = [[text] for text in texts]
    korean = [index for index, text in enumerate(texts) if HANGUL.search(text)]
    if korean:
        analyses = _kiwi(threads()).tokenize([texts[index] for index in korean])
        for index, morphemes in zip(korean, analyses, strict=True):
            offsets = {offset for m in morphemes for offset in (m.start, m.start + m.len)}
            pieces[index] = _cut(texts[index], offsets)
    return pieces


def _cut(text: str, offsets: set[int]) -> list[str]:
    cuts = [
        at
        for at in sorted(offsets)
        if 0 < at < len(text)
        and not text[at - 1].isspace()
        and (HANGUL.match(text, at - 1, at) or HANGUL.match(text, at, at + 1))
    ]
    return [text[begin:end] for begin, end in itertools.pairwise([0, *cuts, len(text)])]
