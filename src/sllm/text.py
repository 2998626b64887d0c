"""Unicode facts every layer shares: the NFC form sllm keeps text in, and which script
(Hangul or Latin) a text's letters are written in, counted without any model."""

from __future__ import annotations

import re
import unicodedata

_LETTERS = re.compile(r"[^\W\d_]+")
SCRIPTS = {
    "ko": re.compile(r"[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]+"),
    "en": re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]+"),
}
SCRIPT_GROUPS = (*SCRIPTS, "other")  # what per-script reports split text into (see script_group)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _count_matching(pattern: re.Pattern[str], text: str) -> int:
    return len(text) - len(pattern.sub("", text))


def script_ratio(text: str, script: str) -> float:
    """Share of the letters of `text` written in `script` ("ko": Hangul, "en": Latin); 0 without letters."""
    letters = _count_matching(_LETTERS, text)
    return _count_matching(SCRIPTS[script], text) / letters if letters else 0.0


def script_group(text: str, min_ratio: float = 0.5) -> str:
    """The script ("ko", "en") holding at least `min_ratio` of the letters, else "other"."""
    return next((script for script in SCRIPTS if script_ratio(text, script) >= min_ratio), "other")
