import json
import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sllm.cli import main
from sllm.errors import UserError
from sllm.tokenizer import (
    UNK_TOKEN,
    WordTokenizer,
    _long_words_cut,
    load_tokenizer,
    nfc,
    train_bpe,
    train_char,
    train_word,
)

from .conftest import constitution_paragraphs, random_run, write_jsonl

SPECIALS = ["<|endoftext|>", "<|pad|>"]
SAMPLES = [
    "대한민국은 민주공화국이다.",
    "The quick brown fox jumps over the lazy dog.",
    "한국어와 English가 섞인 mixed 문장 123개!",
    "emoji 😀🇰🇷👩‍👩‍👧 and symbols ©™ → ∑",
    "  leading and trailing  \t\ttabs\n\n\nnewlines   \r\n",
    "",
    "\u3000전각 공백과 zero\u200bwidth",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter(constitution_paragraphs()), 600, SPECIALS)


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == nfc(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_on_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == nfc(text)


def test_composed_and_decomposed_hangul_encode_alike(bpe):
    composed = "한국어 형태소"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert bpe.encode(decomposed) == bpe.encode(composed)


def test_special_tokens_survive_as_single_ids(bpe):
    text = "끝<|endoftext|>시작<|pad|>"
    ids = bpe.encode(text)
    assert bpe.eos_id in ids and bpe.pad_id in ids
    assert bpe.eos_id == bpe.token_id("<|endoftext|>") and bpe.pad_id == bpe.token_id("<|pad|>")
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_for_korean(bpe):
    # Frequent words of the corpus become few tokens, far fewer than their UTF-8 bytes.
    assert len(bpe.encode("대한민국")) <= len("대한민국".encode()) // 3
    assert bpe.vocab_size == 600


def test_saved_tokenizer_loads_with_same_ids(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.sha256 == bpe.sha256
    assert loaded.encode(SAMPLES[2]) == bpe.encode(SAMPLES[2])


def test_foreign_hf_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    hf = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), "utf-8")
    with pytest.raises(UserError, match="end-of-text"):
        load_tokenizer(tmp_path)


def test_char_tokenizer_round_trip_and_unknown_characters(tmp_path):
    tok = train_char(iter(["가나다 abc\n", "라마"]), SPECIALS)
    text = "다가 cab\n<|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("가")[0] != tok.encode("라")[0]
    assert tok.decode(tok.encode("가z")) == "가" + UNK_TOKEN
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert json.loads(loaded.to_json())["kind"] == "sllm-char"
    assert loaded.encode(text) == tok.encode(text)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_a_users_own_hf_tokenizer_json_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<unk>", "</s>", "<pad>"])
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), "utf-8")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.eos_id == hf.token_to_id("</s>") and loaded.pad_id == hf.token_to_id("<pad>")


def test_bpe_training_cuts_only_words_longer_than_256_characters():
    ordinary = "대한민국은 민주공화국이다. An ordinary sentence, with words."
    dna = "ACGT" * 200
    pieces = list(_long_words_cut([ordinary, f"start {dna} end"]))
    assert pieces[0] == ordinary
    assert "".join(pieces[1:]) == f"start {dna} end"
    assert max(len(word) for piece in pieces for word in piece.split()) == 256


def test_word_tokenizer_keeps_the_most_frequent_words_and_decodes_them_joined_with_spaces(tmp_path):
    paragraphs = constitution_paragraphs()
    word = train_word(iter(paragraphs), 300, SPECIALS)
    assert word.vocab_size == 300 and (word.eos_id, word.pad_id) == (0, 1)
    vocab = word.hf.get_vocab()
    counts = Counter(w for p in paragraphs for w, _ in word.hf.pre_tokenizer.pre_tokenize_str(nfc(p)))
    kept = [w for w, _ in counts.most_common() if w in vocab]
    assert len(kept) == 300 - len(SPECIALS) - 1  # all but the special tokens and <|unk|> are words
    assert min(counts[w] for w in kept) >= max(counts[w] for w in counts if w not in vocab)

    text = "모든 국민은 법률이 정한다.국가는,뷁 있다<|endoftext|>"
    ids = word.encode(text)
    pieces = ["모든", "국민은", "법률이", "정한다", ".", "국가는", ",", UNK_TOKEN, "있다", "<|endoftext|>"]
    assert ids == [vocab[piece] for piece in pieces]
    assert word.decode(ids) == "모든 국민은 법률이 정한다 . 국가는 , <|unk|> 있다 <|endoftext|>"
    assert word.decode(word.encode("대한민국은  모든\n국민은")) == "대한민국은 모든 국민은"
    assert word.encode(unicodedata.normalize("NFD", "대한민국은")) == [vocab["대한민국은"]]
    word.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer) and loaded.encode(text) == ids and loaded.separator == " "


def test_word_kind_trains_from_the_cli_prepares_and_generates(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", constitution_paragraphs())
    main(["tokenizer", "train", "--kind", "word", "--vocab-size", "100000", "--input", str(corpus),
          "--out", str(tmp_path / "tok")])  # fmt: skip
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))
    size = len(saved["model"]["vocab"])
    assert saved["model"]["type"] == "WordLevel" and saved["model"]["unk_token"] == UNK_TOKEN
    assert f"the corpus has only {size:,} tokens (words seen 2+ times" in out

    main(
        [
            "prepare",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    word = load_tokenizer(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text(encoding="utf-8"))
    assert isinstance(word, WordTokenizer) and meta["vocab_size"] == size
    main(["prepare", "--input", str(corpus), "tokenizer.kind=word", "tokenizer.vocab_size=500",
          "--out", str(tmp_path / "d500")])  # fmt: skip
    assert load_tokenizer(tmp_path / "d500").vocab_size == 500
    capsys.readouterr()

    run = random_run(tmp_path / "run", word)
    main(["generate", "--run", str(run), "--prompt", "대한민국은", "--max-new-tokens", "4", "--top-k", "1"])
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith("대한민국은 ") and len(printed.split(" ")) >= 2
    assert all(w in word.hf.get_vocab() for w in printed.split(" ")[1:])
