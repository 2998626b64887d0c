"""The `tiktoken` fast path gives exactly the ids `tokenizers` gives, or is not used."""

from __future__ import annotations

import json
import os
import random
import signal
import sys

import pytest

from sllm.tokenizer import BPETokenizer, train_bpe
from tests.conftest import SHARED_DATA, constitution_paragraphs

pytest.importorskip("tiktoken")

SPECIALS = ["<|endoftext|>", "<|pad|>"]
TRICKY = [
    "",
    " ",
    "\n\n\n",
    "대한민국은 민주공화국이다.<|endoftext|>다음 문서",
    "<|pad|><|pad|>",
    "<|endoftext|>\u0338 NFC would join the special token's '>' with this combining mark",
    "끝<|endoftext|>",
    "decomposed 한국어: \u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165",
    "it's we'll they'd I'M  double  spaces\ttab\r\nwindows",
    "numbers 1234567 3.14159 ١٢٣ ½ 2026-11-24",
    "emoji 😀👍🏽 and CJK 漢字 かな ﬁ ligature",
    "   leading and trailing   ",
    "\x00\x01 control \u200b zero width",
]


def real_texts() -> list[str]:
    """The constitution, and where ../shared is beside us, Korean reviews and English text."""
    texts = constitution_paragraphs()
    if SHARED_DATA.is_dir():
        reviews = json.loads(next((SHARED_DATA / "nsmc" / "raw").glob("*.json")).read_text("utf-8"))
        texts += [r["review"] for r in reviews[:3000] if r.get("review")]
        english = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text("utf-8")
        texts += english.split("\n\n")[:3000]
    return texts


def hf_ids(tokenizer: BPETokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return real_texts()


@pytest.mark.parametrize("vocab_size", [300, 2048])
def test_fast_path_gives_tokenizers_ids(texts, vocab_size):
    tokenizer = train_bpe(iter(texts[::2]), vocab_size, SPECIALS)
    assert tokenizer.fast is not None
    pieces = [tokenizer.decode([i]) for i in range(len(SPECIALS), tokenizer.vocab_size)]
    rng = random.Random(0)
    adjacent_tokens = ["".join(rng.choices(pieces, k=3)) for _ in range(5000)]
    batch = texts + TRICKY + adjacent_tokens
    assert tokenizer.encode_batch(batch) == hf_ids(tokenizer, batch)
    assert [tokenizer.encode(text) for text in TRICKY] == hf_ids(tokenizer, TRICKY)


def test_special_tokens_are_cut_out_like_tokenizers_does(texts):
    tokenizer = train_bpe(iter(texts), 400, SPECIALS)
    ids = tokenizer.encode("끝<|endoftext|>시작")
    assert ids.count(tokenizer.eos_id) == 1
    tokenizer.hf.add_special_tokens(["<|user|>", "<|user|>:", "<|end|>"])  # one is the other's prefix
    tokenizer = BPETokenizer(tokenizer.hf)
    assert tokenizer.fast is not None
    chat = ["<|user|>: 안녕하세요<|end|><|user|>한국어<|end|>", "<|user|>:<|user|><|end|>x", *TRICKY]
    assert tokenizer.encode_batch(chat) == hf_ids(tokenizer, chat)


def test_tokenizers_it_cannot_reproduce_keep_tokenizers(texts):
    from tokenizers import pre_tokenizers

    tokenizer = train_bpe(iter(texts), 400, SPECIALS)
    tokenizer.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert BPETokenizer(tokenizer.hf).fast is None

    spec = json.loads(train_bpe(iter(texts), 400, SPECIALS).to_json())
    vocab = spec["model"]["vocab"]
    last, second_last = sorted(vocab, key=vocab.get)[-2:]
    vocab[last], vocab[second_last] = vocab[second_last], vocab[last]
    from tokenizers import Tokenizer

    reordered = BPETokenizer(Tokenizer.from_str(json.dumps(spec)))
    assert reordered.fast is None
    assert reordered.encode_batch(texts[:50]) == hf_ids(reordered, texts[:50])


def _byte_level_bpe(merges: list[list[str]], **settings) -> BPETokenizer:
    """A hand-made byte-level BPE: the 256 bytes, then one token per merge, in merge order."""
    from tokenizers import Tokenizer

    spec = json.loads(train_bpe(iter(["a"]), 300, SPECIALS).to_json())
    bytes_only = {
        token: i for token, i in spec["model"]["vocab"].items() if len(token) == 1 or token in SPECIALS
    }
    vocab = bytes_only | {left + right: len(bytes_only) + n for n, (left, right) in enumerate(merges)}
    spec["model"] |= {"vocab": vocab, "merges": merges}
    return BPETokenizer(Tokenizer.from_str(json.dumps(spec | settings)))


def test_merges_that_cannot_rebuild_a_token_keep_tokenizers():
    tokenizer = _byte_level_bpe([["b", "c"], ["a", "b"], ["ab", "c"]])  # "abc" encodes as a + bc
    assert tokenizer.fast is None
    assert tokenizer.encode("abc") == hf_ids(tokenizer, ["abc"])[0] != [tokenizer.token_id("abc")]
    assert _byte_level_bpe([["a", "b"], ["ab", "c"]]).fast is not None


@pytest.mark.parametrize(
    "setting",
    [
        {"padding": {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"}},
        {"truncation": {"direction": "Right", "max_length": 200, "strategy": "LongestFirst", "stride": 0}},
    ],
)  # fmt: skip
def test_padding_or_truncation_keeps_tokenizers(setting):
    tokenizer = _byte_level_bpe([["a", "b"]], **setting)
    assert tokenizer.fast is None
    texts = ["ab" * 300, "b"]
    assert tokenizer.encode_batch(texts) == hf_ids(tokenizer, texts)


def test_tokenizers_parallelism_off_means_one_encoding_thread(monkeypatch):
    from sllm.fast_bpe import threads

    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    assert threads() == 3
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert threads() == 1


def test_without_tiktoken_tokenizers_encodes(texts, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    tokenizer = train_bpe(iter(texts), 400, SPECIALS)
    assert tokenizer.fast is None
    assert tokenizer.encode_batch(texts[:50]) == hf_ids(tokenizer, texts[:50])


@pytest.mark.slow
def test_every_unicode_character_splits_and_merges_as_in_tokenizers(texts):
    """The two libraries' regex engines carry their own Unicode tables (letters, numbers)."""
    tokenizer = train_bpe(iter(texts), 2048, SPECIALS)
    characters = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    pattern = "{0}a {0}1 x{0}{0}, '{0}s  "
    documents = [
        "".join(pattern.format(c) for c in characters[i : i + 400]) for i in range(0, len(characters), 400)
    ]
    assert tokenizer.encode_batch(documents) == hf_ids(tokenizer, documents)


def test_lone_surrogates_encode_as_the_replacement_character_on_both_paths(texts, monkeypatch):
    fast = train_bpe(iter(texts), 400, SPECIALS)
    assert fast.fast is not None
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    plain = train_bpe(iter(texts), 400, SPECIALS)
    assert plain.fast is None
    broken = ["ab\ud800cd", "\udfff", "한\udc00국<|endoftext|>\ud83d"]
    repaired = ["ab\ufffdcd", "\ufffd", "한\ufffd국<|endoftext|>\ufffd"]
    for tokenizer in (fast, plain):
        assert tokenizer.encode_batch(broken) == hf_ids(tokenizer, repaired)
        assert tokenizer.decode(tokenizer.encode(broken[0])) == repaired[0]


def test_a_batch_is_encoded_as_one_joined_string_on_threads_with_each_texts_own_ids(texts, monkeypatch):
    from sllm.fast_bpe import FastByteLevelBPE

    tokenizer = train_bpe(iter(texts[::2]), 2048, SPECIALS)
    plain = [text for text in texts + TRICKY if "<|" not in text]
    expected = hf_ids(tokenizer, plain)

    def refuse(*_):
        raise AssertionError("a batch without special tokens was encoded text by text")

    monkeypatch.setattr(FastByteLevelBPE, "_encode_each", refuse)
    for threads in ("1", "3"):
        monkeypatch.setenv("RAYON_NUM_THREADS", threads)
        assert tokenizer.encode_batch(plain) == expected
        ids, lengths = tokenizer.encode_documents(plain)
        assert ids.tolist() == [i for one in expected for i in (*one, tokenizer.eos_id)]
        assert lengths.tolist() == [len(one) + 1 for one in expected]


@pytest.mark.parametrize(
    "odd", ["a\U0010ffffb", "끝<|endoftext|>시작", "\U0010ffff", "<|pad|>a\U0010ffff<|pad|>"]
)
def test_a_batch_holding_the_join_character_or_a_special_token_keeps_each_texts_ids(texts, odd, monkeypatch):
    """Special tokens are cut out and the rest still encoded joined; only the join character
    itself sends its part text by text."""
    from sllm.fast_bpe import FastByteLevelBPE

    if "\U0010ffff" not in odd:
        monkeypatch.setattr(FastByteLevelBPE, "_encode_each", None)  # must not be called
    tokenizer = train_bpe(iter(texts), 400, SPECIALS)
    assert tokenizer.encode_batch([]) == [] and tokenizer.encode_documents([])[1].tolist() == []
    batch = [*texts[:20], odd, "", *TRICKY[-4:]]
    ids, lengths = tokenizer.encode_documents(batch)
    expected = hf_ids(tokenizer, batch)
    assert tokenizer.encode_batch(batch) == expected
    assert ids.tolist() == [i for one in expected for i in (*one, tokenizer.eos_id)]
    assert lengths.tolist() == [len(one) + 1 for one in expected]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_encodes_on_threads_of_its_own(texts, monkeypatch):
    """The parent's encoding threads do not exist in a forked child (a DataLoader worker, say)."""
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    tokenizer = train_bpe(iter(texts), 400, SPECIALS)
    plain = [text for text in texts if "<|" not in text]
    expected = tokenizer.encode_batch(plain)
    child = os.fork()
    if child == 0:
        signal.alarm(30)  # a child waiting on threads it does not have dies instead of hanging
        os._exit(0 if tokenizer.encode_batch(plain) == expected else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
