"""`tokenizer.pretokenize: kiwi`: byte-level BPE whose merges never cross a Korean morpheme
boundary, exact round trips, and every command that encodes (prepare, generate, export)."""

import importlib.util
import itertools
import json
import sys

import pytest

from sllm.cli import main
from sllm.config import load_config
from sllm.errors import UserError
from sllm.export import export_run
from sllm.export_gguf import export_gguf
from sllm.run import open_run
from sllm.tokenizer import PRETOKENIZE_KEY, load_tokenizer, nfc, train_bpe

from .conftest import constitution_paragraphs, prepare_corpus, random_run, write_jsonl

needs_kiwi = pytest.mark.skipif(
    importlib.util.find_spec("kiwipiepy") is None, reason="needs kiwipiepy (pip install 'sllm[ko]')"
)
SPECIALS = ["<|endoftext|>", "<|pad|>"]
REPEATED = "학생들은 학교에서 공부한다."
HOSTILE = [
    "아버지가방에들어가신다",  # no spaces: the analyzer must guess the words
    "했다ㅋㅋㅋ😀😀 안녕하세요ABC는 good입니다!!",  # a contraction (하+었), jamo, emoji, Latin
    "e\u0301 \u1112\u1161\u11ab\u1100\u1173\u11af 한국어",  # decomposed Latin and Hangul: NFC first
    "  \t\n\n나는  학교에갔다 .  ",  # runs of whitespace, a stray space before the period
    "👨‍👩‍👧가족🇰🇷태극기",  # ZWJ sequences and flags between syllables
    "학교에서<|endoftext|>집으로<|pad|>",  # special tokens inside Korean
    "한\ud800국",  # a lone surrogate: U+FFFD, as everywhere
    "ᄒᆞᆫ글 뷁뷁 쀍 ㄱㄴㄷ ㅏㅑ 1,234.5원",  # archaic jamo, rare syllables, numbers
    "",
]


@pytest.fixture(scope="module")
def kiwi_bpe():
    return train_bpe(iter(constitution_paragraphs() + [REPEATED] * 50), 700, SPECIALS, pretokenize="kiwi")


def _expected(text: str) -> str:
    return nfc(text).replace("\ud800", "\ufffd")


@needs_kiwi
def test_round_trip_of_hostile_korean_text_is_exact(kiwi_bpe, tmp_path):
    kiwi_bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pretokenize == "kiwi"
    for text in HOSTILE:
        assert kiwi_bpe.decode(kiwi_bpe.encode(text)) == _expected(text)
        assert loaded.encode(text) == kiwi_bpe.encode(text)
    assert kiwi_bpe.encode_batch(HOSTILE) == [kiwi_bpe.encode(text) for text in HOSTILE]


@needs_kiwi
def test_pieces_join_to_the_text_and_are_cut_only_beside_hangul():
    from sllm.morphemes import HANGUL, morpheme_pieces

    texts = [nfc(text) for text in HOSTILE[:-3]]
    for text, pieces in zip(texts, morpheme_pieces(texts), strict=True):
        assert "".join(pieces) == text
        for left, right in itertools.pairwise(pieces):
            assert not left[-1].isspace()
            assert HANGUL.match(left[-1]) or HANGUL.match(right[0])
    assert morpheme_pieces(["학교에서", "no Hangul here: it's left whole"]) == [
        ["학교", "에서"],
        ["no Hangul here: it's left whole"],
    ]


@needs_kiwi
def test_no_merge_crosses_a_morpheme_boundary(kiwi_bpe):
    from sllm.morphemes import morpheme_pieces

    plain = train_bpe(iter(constitution_paragraphs() + [REPEATED] * 50), 700, SPECIALS)

    def vocabulary(tokenizer):
        return {tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}

    assert " 학교에서" in vocabulary(plain)  # plain BPE merges stem and particle
    assert " 학교" in vocabulary(kiwi_bpe) and " 학교에서" not in vocabulary(kiwi_bpe)
    for text in [REPEATED, *constitution_paragraphs()[:20]]:
        pieces = morpheme_pieces([text])[0]
        cuts = set(itertools.accumulate(len(piece.encode()) for piece in pieces))
        ends = set(itertools.accumulate(len(kiwi_bpe.hf.id_to_token(i)) for i in kiwi_bpe.encode(text)))
        assert cuts <= ends  # every morpheme boundary is a token boundary (a byte-level token: 1 char a byte)


@needs_kiwi
def test_encoding_equals_a_one_shot_encode_with_the_cut_as_the_hf_pre_tokenizer(kiwi_bpe):
    """The HF-native form of the design: a custom Python pre-tokenizer (which cannot be saved)
    cutting at morphemes before the byte-level split; sllm's piecewise encode gives its ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from sllm.morphemes import morpheme_pieces

    class MorphemeCut:
        def pre_tokenize(self, pretok):
            pretok.split(lambda _, normalized: _cut(normalized))

    def _cut(normalized):
        bounds = [0, *itertools.accumulate(map(len, morpheme_pieces([str(normalized)])[0]))]
        return [normalized[begin:end] for begin, end in itertools.pairwise(bounds) if end > begin]

    hf = HFTokenizer.from_str(kiwi_bpe.hf.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.PreTokenizer.custom(MorphemeCut()), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [*HOSTILE[:-3], *constitution_paragraphs()[:30]]:
        assert kiwi_bpe.encode(text) == hf.encode(text, add_special_tokens=False).ids


@needs_kiwi
def test_the_file_records_kiwi_and_the_tokenizers_library_refuses_it_alone(kiwi_bpe, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = kiwi_bpe.save(tmp_path)
    assert json.loads(path.read_text())[PRETOKENIZE_KEY] == "kiwi"
    with pytest.raises(Exception):  # noqa: B017 - what matters is that it cannot load without the cut
        HFTokenizer.from_file(str(path))
    path.write_text(path.read_text().replace('"kiwi"', '"mecab"'))
    with pytest.raises(UserError, match="pre-tokenizer 'mecab'; sllm knows none, kiwi"):
        load_tokenizer(path)


@needs_kiwi
def test_parallel_prepare_equals_serial_prepare_byte_for_byte(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs())
    outputs = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("RAYON_NUM_THREADS", threads)
        kiwi = ["tokenizer.vocab_size=400", "tokenizer.pretokenize=kiwi", "data.val_ratio=0.1"]
        prepare_corpus(corpus, tmp_path / threads, *kiwi)
        outputs[threads] = {p.name: p.read_bytes() for p in sorted((tmp_path / threads).iterdir())}
    assert outputs["1"] == outputs["2"]
    assert load_tokenizer(tmp_path / "1").pretokenize == "kiwi"


@needs_kiwi
def test_generate_encodes_prompts_with_the_cut_and_export_is_refused(kiwi_bpe, tmp_path, capsys):
    run_dir = random_run(tmp_path / "run", kiwi_bpe)
    assert open_run(run_dir, "cpu").tokenizer.encode(REPEATED) == kiwi_bpe.encode(REPEATED)
    main(
        [
            "generate",
            "--run",
            str(run_dir),
            "--prompt",
            "학교에서",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert capsys.readouterr().out.startswith("학교에서")
    with pytest.raises(
        UserError, match="cuts Korean at morphemes with kiwi, which `transformers` cannot run"
    ):
        export_run(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="byte-level BPE tokenizer without a morpheme cut"):
        export_gguf(run_dir, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_missing_analyzer_names_the_extra(monkeypatch):
    from sllm import morphemes

    monkeypatch.setitem(sys.modules, "kiwipiepy", None)
    morphemes._kiwi.cache_clear()
    with pytest.raises(UserError, match=r"needs the `kiwipiepy` package; pip install 'sllm\[ko\]'"):
        morphemes.morpheme_pieces(["한국어"])
    morphemes._kiwi.cache_clear()


def test_pretokenize_is_for_bpe_only():
    with pytest.raises(UserError, match="tokenizer.pretokenize applies to tokenizer.kind=bpe only"):
        load_config(None, ["tokenizer.kind=char", "tokenizer.pretokenize=kiwi"])


@needs_kiwi
def test_tokenizer_train_takes_the_pretokenize_flag(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", constitution_paragraphs()[:40])
    main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--pretokenize", "kiwi",
          "--out", str(tmp_path / "tok")])  # fmt: skip
    assert load_tokenizer(tmp_path / "tok").pretokenize == "kiwi"
