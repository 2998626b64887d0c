"""Morpheme-aware pre-tokenization of Korean (`tokenizer.pretokenize: kiwi`).

A Korean word (학교에서: stem + particle) is one piece of byte-level BPE's regex, so plain BPE
merges across morphemes. Here text is first cut where the `kiwipiepy` analyzer puts a boundary
beside a Hangul character (not after whitespace: there the regex decides), at its character
offsets into the text, never from its morpheme forms (갔다 is 가 + 었 + 다), so the pieces join
back to exactly the text. Text without Hangul never reaches the analyzer.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

from sllm.errors import UserError
from sllm.fast_bpe import threads
from sllm.text import SCRIPTS, nfc

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


def training_pieces(texts: Iterator[str], batch_texts: int = 256) -> Iterator[str]:
    """The NFC texts' pieces, analyzed a batch at a time, for the BPE trainer."""
    for batch in iter(lambda: [nfc(text) for text in itertools.islice(texts, batch_texts)], []):
        yield from itertools.chain.from_iterable(morpheme_pieces(batch))


def morpheme_pieces(texts: list[str]) -> list[list[str]]:
    """Each text cut at morpheme boundaries beside Hangul (pieces join to the text), in one call."""
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
