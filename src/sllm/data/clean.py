"""Document cleaning between reading and tokenizing: small steps, each switchable and counted.

Rewrites run first (NFC; control and zero-width characters but (non-)joiners; whitespace), then
filters drop a document for one reason each (length, language, exact or near duplicate), so
copies differing only in invisible characters or spacing are duplicates. The language filter
compares letter counts by script (no model to download). Exact dedup (16 bytes a document) and
near dedup (MinHash LSH over character 5-grams) grow with the corpus: off by default.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sllm.data.sources import require_module
from sllm.text import nfc, script_ratio

ZERO_WIDTH = "\u200b\u2060\ufeff\u00ad\u180e"
_CONTROL = re.compile(
    "["
    + "".join(chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t")
    + ZERO_WIDTH
    + "]"
)
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_LINE_EDGE_SPACE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_IRREGULAR_SPACE = re.compile(r"[^\S\n ]|  | \n|\n |\n\n\n")  # what the three above would rewrite
SHINGLE_CHARS = 5
MINHASH_PERMUTATIONS = 64


def remove_control_chars(text: str) -> str:
    """Drop C0/C1 control and zero-width characters; CR and CRLF become LF, tabs stay."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text) if _CONTROL.search(text) else text


def normalize_whitespace(text: str) -> str:
    """One space for each run of spaces/tabs, no spaces at line ends, at most one blank line."""
    if not _IRREGULAR_SPACE.search(text) and text.strip() == text:
        return text  # most documents: found at a fraction of the cost of rewriting them
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = _LINE_EDGE_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


class ExactDedup:
    """Keeps a document the first time its exact text is seen."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


class NearDedup:
    """Keeps a document unless an earlier one has an estimated Jaccard similarity ≥ threshold."""

    def __init__(self, threshold: float) -> None:
        datasketch = require_module("datasketch", "data.near_dedup_threshold")
        self._minhash = datasketch.MinHash
        self.index = datasketch.MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
        self.count = 0

    def __call__(self, text: str) -> bool:
        compact = " ".join(text.split())
        last = max(len(compact) - SHINGLE_CHARS, 0)
        shingles = {compact[i : i + SHINGLE_CHARS].encode("utf-8") for i in range(last + 1)}
        signature = self._minhash(num_perm=MINHASH_PERMUTATIONS)
        signature.update_batch(list(shingles))
        if self.index.query(signature):
            return False
        self.count += 1
        self.index.insert(str(self.count), signature)
        return True


@dataclass
class CleanReport:
    """Documents kept, rewritten per step and dropped per reason."""

    kept: int = 0
    changed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


class Cleaner:
    """The configured steps of `data` (a DataConfig); call it on an iterable of documents."""

    def __init__(self, data: Any) -> None:
        self.report = CleanReport()
        self.rewrites: list[tuple[str, Callable[[str], str]]] = [("nfc", nfc)]
        if data.clean_control_chars:
            self.rewrites.append(("control_chars", remove_control_chars))
        if data.normalize_whitespace:
            self.rewrites.append(("whitespace", normalize_whitespace))
        self.filters: list[tuple[str, Callable[[str], bool]]] = []
        if data.min_chars:
            self.filters.append(("too_short", lambda text: len(text) >= data.min_chars))
        if data.max_chars:
            self.filters.append(("too_long", lambda text: len(text) <= data.max_chars))
        if data.language != "any":
            wanted, ratio = data.language, data.min_script_ratio
            self.filters.append(("wrong_language", lambda text: script_ratio(text, wanted) >= ratio))
        if data.dedup:
            self.filters.append(("duplicate", ExactDedup()))
        if data.near_dedup_threshold:
            self.filters.append(("near_duplicate", NearDedup(data.near_dedup_threshold)))

    def clean(self, text: str) -> str | None:
        """The cleaned document, or None when a filter drops it (the reason is counted)."""
        for step, rewrite in self.rewrites:
            cleaned = rewrite(text)
            if cleaned != text:
                self.report.changed[step] += 1
                text = cleaned
        if not text.strip():
            self.report.dropped["empty_after_cleaning"] += 1
            return None
        for reason, keep in self.filters:
            if not keep(text):
                self.report.dropped[reason] += 1
                return None
        self.report.kept += 1
        return text

    def __call__(self, documents: Iterable[str]) -> Iterator[str]:
        for text in documents:
            cleaned = self.clean(text)
            if cleaned is not None:
                yield cleaned
