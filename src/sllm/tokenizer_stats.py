"""Tokenizer quality on real text: compression and coverage, Korean and English apart.

Each line is classified by its dominant script (mixed lines count only in the total) and
encoded alone, so the numbers do not depend on how files are cut into documents. A fallback
token does not stand for whole characters: a byte-level BPE token that is not valid UTF-8
alone (a rare Hangul syllable spelled in bytes), or the char and word kinds' `<|unk|>`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from sllm.errors import UserError
from sllm.text import SCRIPT_GROUPS, script_group
from sllm.tokenizer import UNK_TOKEN, CharTokenizer, Tokenizer, nfc

GROUPS = (*SCRIPT_GROUPS, "all")
ENCODE_BATCH_LINES = 2048


@dataclass
class GroupStats:
    """Totals of one script group."""

    lines: int = 0
    chars: int = 0
    bytes: int = 0
    words: int = 0
    tokens: int = 0
    fallback_tokens: int = 0

    def add(self, line: str, ids: list[int], fallback: np.ndarray) -> None:
        self.lines += 1
        self.chars += len(line)
        self.bytes += len(line.encode("utf-8"))
        self.words += len(line.split())
        self.tokens += len(ids)
        self.fallback_tokens += int(fallback[ids].sum()) if ids else 0

    def per(self, unit: str) -> float:
        return self.tokens / max(getattr(self, unit), 1)


@dataclass
class TokenizerStats:
    vocab_size: int
    seen: np.ndarray  # per token id: whether the text used it
    groups: dict[str, GroupStats] = field(default_factory=lambda: {g: GroupStats() for g in GROUPS})

    @property
    def vocab_used(self) -> int:
        return int(self.seen.sum())


def fallback_table(tokenizer: Tokenizer) -> np.ndarray:
    """True for each token id that does not stand for whole characters (see the module doc)."""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    if not isinstance(tokenizer, CharTokenizer):
        table[:] = ["\ufffd" in tokenizer.decode([token_id]) for token_id in range(tokenizer.vocab_size)]
    unk_id = tokenizer.token_id(UNK_TOKEN)
    if unk_id is not None:
        table[unk_id] = True
    return table


def measure(tokenizer: Tokenizer, documents: Iterable[str]) -> TokenizerStats:
    """Token counts per character, byte and word by script, fallback share and vocabulary use."""
    stats = TokenizerStats(tokenizer.vocab_size, np.zeros(tokenizer.vocab_size, dtype=bool))
    fallback = fallback_table(tokenizer)
    lines = (line for document in documents for line in nfc(document).splitlines() if line.strip())
    for batch in iter(lambda: list(itertools.islice(lines, ENCODE_BATCH_LINES)), []):
        for line, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            group = script_group(line)
            stats.groups[group].add(line, ids, fallback)
            stats.groups["all"].add(line, ids, fallback)
            stats.seen[ids] = True
    if stats.groups["all"].lines == 0:
        raise UserError("the input holds no text to measure; check --input and --text-field")
    return stats


def format_stats(stats: TokenizerStats) -> str:
    header = (
        f"{'script':<6} {'lines':>9} {'chars':>12} {'tokens':>11} "
        f"{'tok/char':>8} {'tok/byte':>8} {'tok/word':>8} {'fallback':>8}"
    )
    rows = [header]
    for name, group in stats.groups.items():
        if group.lines:
            rows.append(
                f"{name:<6} {group.lines:>9,} {group.chars:>12,} {group.tokens:>11,} "
                f"{group.per('chars'):>8.3f} {group.per('bytes'):>8.3f} {group.per('words'):>8.3f} "
                f"{group.fallback_tokens / max(group.tokens, 1):>8.2%}"
            )
    share = stats.vocab_used / stats.vocab_size
    rows.append(f"vocabulary use: {stats.vocab_used:,} of {stats.vocab_size:,} tokens seen ({share:.1%})")
    return "\n".join(rows)
