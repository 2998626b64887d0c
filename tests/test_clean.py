import json
import unicodedata

import pytest

from sllm.config import load_config
from sllm.data.clean import Cleaner, normalize_whitespace, remove_control_chars
from sllm.data.prepare import prepare
from sllm.errors import UserError
from sllm.text import script_ratio

from .conftest import constitution_paragraphs, write_jsonl


def _cleaner(*overrides: str) -> Cleaner:
    return Cleaner(load_config(None, list(overrides)).data)


def _clean_all(cleaner: Cleaner, texts: list[str]) -> list[str]:
    return list(cleaner(texts))


def test_nfc_composes_decomposed_hangul_and_keeps_composed():
    decomposed = unicodedata.normalize("NFD", "한국어")
    cleaner = _cleaner()
    assert _clean_all(cleaner, [decomposed, "한국어"]) == ["한국어", "한국어"]
    assert cleaner.report.changed["nfc"] == 1


def test_control_and_zero_width_characters_are_removed_but_newlines_and_tabs_stay():
    assert remove_control_chars("가\x00나\u200b다\ufeff\x1b[0m\r\n라\t마") == "가나다[0m\n라\t마"
    kept = "줄 하나\n\t들여쓴 줄 👩\u200d👩\u200d👧"
    assert remove_control_chars(kept) == kept
    cleaner = _cleaner("data.clean_control_chars=false")
    assert _clean_all(cleaner, ["가\u200b나"]) == ["가\u200b나"]


def test_whitespace_normalization_keeps_paragraph_breaks():
    messy = "  첫  문단\t 첫 줄   \n둘째 줄\u3000\n\n\n\n둘째   문단  \n"
    assert normalize_whitespace(messy) == "첫 문단 첫 줄\n둘째 줄\n\n둘째 문단"
    tidy = "이미 정돈된 문단.\n\n다음 문단."
    assert normalize_whitespace(tidy) == tidy
    on = _cleaner("data.normalize_whitespace=true")
    assert _clean_all(on, [messy, tidy]) == ["첫 문단 첫 줄\n둘째 줄\n\n둘째 문단", tidy]
    assert on.report.changed["whitespace"] == 1
    assert _clean_all(_cleaner(), [messy]) == [messy]  # off by default


def test_length_filter_drops_short_and_long_documents():
    cleaner = _cleaner("data.min_chars=3", "data.max_chars=5")
    assert _clean_all(cleaner, ["가나", "가나다", "가나다라마", "가나다라마바"]) == ["가나다", "가나다라마"]
    assert cleaner.report.dropped == {"too_short": 1, "too_long": 1}
    assert cleaner.report.kept == 2


def test_exact_dedup_drops_later_copies_after_cleaning():
    texts = ["같은 문서", "다른 문서", "같은\u200b 문서", "같은 문서"]
    cleaner = _cleaner("data.dedup=true")
    assert _clean_all(cleaner, texts) == ["같은 문서", "다른 문서"]
    assert cleaner.report.dropped["duplicate"] == 2
    assert _clean_all(_cleaner(), texts) == ["같은 문서", "다른 문서", "같은 문서", "같은 문서"]


def test_language_filter_keeps_documents_of_the_wanted_script():
    korean = "대한민국은 민주공화국이다. AI 모델도 있다."
    english = "The quick brown fox jumps over the lazy dog."
    assert script_ratio(korean, "ko") > 0.7 and script_ratio(english, "en") == 1.0
    assert script_ratio("12345 !!", "ko") == 0.0
    ko = _cleaner("data.language=ko")
    assert _clean_all(ko, [korean, english, "12345"]) == [korean]
    assert ko.report.dropped["wrong_language"] == 2
    en = _cleaner("data.language=en", "data.min_script_ratio=0.9")
    assert _clean_all(en, [korean, english]) == [english]


def test_near_dedup_drops_a_lightly_edited_copy():
    pytest.importorskip("datasketch")
    base = " ".join(constitution_paragraphs()[:5])
    edited = base.replace("국민", "시민", 1)
    other = " ".join(constitution_paragraphs()[20:25])
    cleaner = _cleaner("data.near_dedup_threshold=0.8")
    assert _clean_all(cleaner, [base, edited, other]) == [base, other]
    assert cleaner.report.dropped["near_duplicate"] == 1


def test_invalid_cleaning_settings_are_user_errors():
    with pytest.raises(UserError, match="max_chars"):
        load_config(None, ["data.min_chars=10", "data.max_chars=5"])
    with pytest.raises(UserError, match="data.language"):
        load_config(None, ["data.language=fr"])
    with pytest.raises(UserError, match="min_script_ratio"):
        load_config(None, ["data.min_script_ratio=0"])


def test_prepare_reports_cleaning_counts_in_meta_and_summary(tmp_path):
    texts = [*constitution_paragraphs()[:40], constitution_paragraphs()[0], "짧음", "English only line here"]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    overrides = [
        f"data.inputs={json.dumps([str(corpus)])}",
        f"data.dir={tmp_path / 'out'}",
        "tokenizer.vocab_size=400",
        "data.val_ratio=0",
        "data.dedup=true",
        "data.min_chars=5",
        "data.language=ko",
    ]
    cfg = load_config(None, overrides)
    messages: list[str] = []
    meta = prepare(cfg.data, cfg.tokenizer, log=messages.append)
    assert meta.cleaning.dropped == {"duplicate": 1, "too_short": 1, "wrong_language": 1}
    assert meta.cleaning.kept == meta.splits["train"].documents == 40
    assert "dropped: 1 duplicate, 1 too short, 1 wrong language" in messages[-1]


def test_cleaning_everything_away_is_explained(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["짧다", "짧음"])
    cfg = load_config(None, [f"data.inputs={json.dumps([str(corpus)])}", f"data.dir={tmp_path / 'o'}",
                             "data.min_chars=100"])  # fmt: skip
    with pytest.raises(
        UserError, match=r"cleaning dropped all 2 documents \(2 too short\); loosen data.min_chars"
    ):
        prepare(cfg.data, cfg.tokenizer, log=lambda _: None)


def test_the_quick_checks_skip_only_documents_the_rewrites_leave_alone():
    """Each step searches before it rewrites; on any text the result is the full rewrite's."""
    import random
    import re

    controls = {c: None for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}
    controls |= {ord(c): None for c in "\u200b\u2060\ufeff\u00ad\u180e"}
    alphabet = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\x85", "\x9f", "\xa0",
                "\u200b", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u3000", "\u2028", "a", "가"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(50_000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 10)))
        assert remove_control_chars(text) == text.replace("\r\n", "\n").replace("\r", "\n").translate(
            controls
        )
        spaced = re.sub(r" ?\n ?", "\n", re.sub(r"[^\S\n]+", " ", text))
        assert normalize_whitespace(text) == re.sub(r"\n{3,}", "\n\n", spaced).strip()
