import pytest

from sllm.cli import main
from sllm.tokenizer import train_bpe, train_char, train_word
from sllm.tokenizer_stats import fallback_table, format_stats, measure

SPECIALS = ["<|endoftext|>", "<|pad|>"]
KOREAN = ["대한민국은 민주공화국이다.", "모든 국민은 법 앞에 평등하다."]
ENGLISH = ["the cat sat on the mat.", "the dog sat on the log."]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter((KOREAN + ENGLISH) * 20), 1000, SPECIALS)


def test_counts_per_char_byte_and_word_are_split_by_script(bpe):
    stats = measure(bpe, ["\n".join(KOREAN), "\n\n".join(ENGLISH), "12345"])
    ko, en = stats.groups["ko"], stats.groups["en"]
    assert (ko.lines, en.lines, stats.groups["other"].lines, stats.groups["all"].lines) == (2, 2, 1, 5)
    assert ko.chars == sum(len(t) for t in KOREAN)
    assert ko.bytes == sum(len(t.encode()) for t in KOREAN)
    assert en.words == 12
    assert ko.tokens == sum(len(bpe.encode(t)) for t in KOREAN)
    assert en.per("words") == en.tokens / 12
    assert stats.groups["all"].tokens == ko.tokens + en.tokens + len(bpe.encode("12345"))


def test_byte_fallback_tokens_are_pieces_of_unseen_characters(bpe):
    table = fallback_table(bpe)
    assert table[bpe.encode("\xe9")[0]]  # é: two byte tokens, neither a character alone
    assert not table[bpe.encode("a")[0]]
    seen = measure(bpe, KOREAN)
    unseen = measure(bpe, ["뷁뷁뷁"])  # a syllable never seen in training: only byte pieces
    assert seen.groups["ko"].fallback_tokens == 0
    assert unseen.groups["ko"].fallback_tokens == unseen.groups["ko"].tokens >= 3


def test_vocabulary_use_counts_distinct_tokens_seen(bpe):
    stats = measure(bpe, ["the the the"])
    assert stats.vocab_used == len(set(bpe.encode("the the the")))
    assert f"of {bpe.vocab_size:,} tokens seen" in format_stats(stats)


def test_char_tokenizer_counts_unknown_characters_as_fallback():
    char = train_char(iter(KOREAN), SPECIALS)
    stats = measure(char, ["대한민국 xyz"])
    assert stats.groups["all"].fallback_tokens == 3


def test_word_tokenizer_counts_unknown_words_as_fallback():
    word = train_word(iter(KOREAN + ENGLISH), 100, SPECIALS, min_frequency=1)
    stats = measure(word, ["the cat sat on a sofa.", "모든 국민은 자유롭다"])
    assert (stats.groups["en"].tokens, stats.groups["en"].fallback_tokens) == (7, 2)  # a, sofa
    assert (stats.groups["ko"].tokens, stats.groups["ko"].fallback_tokens) == (3, 1)


def test_cli_prints_the_table_and_rejects_empty_input(tmp_path, capsys):
    directory = tmp_path / "tok"
    train_bpe(iter(KOREAN * 10), 300, SPECIALS).save(directory)
    text = tmp_path / "mixed.txt"
    text.write_text("\n".join(KOREAN + ENGLISH), "utf-8")
    main(["tokenizer", "stats", "--tokenizer", str(directory), "--input", str(text)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["script", "lines"]
    assert [line.split()[0] for line in lines[1:4]] == ["ko", "en", "all"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", "utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "stats", "--tokenizer", str(directory), "--input", str(empty)])
    assert exit_info.value.code == 2
    assert "holds no text" in capsys.readouterr().err
