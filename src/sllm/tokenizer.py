"""One tokenizer interface over three kinds: byte-level BPE and words (HF `tokenizers`), and
characters.

All normalize to NFC first, so composed and decomposed Hangul encode alike; BPE and char
round-trip exactly (`decode(encode(x)) == nfc(x)`), words are joined with spaces. Unseen chars and
words map to `<|unk|>`. A BPE may cut Korean at morphemes first (`sllm.morphemes`): HF cannot
save that pre-tokenizer, so the file carries `"sllm_pretokenize": "kiwi"`, which `tokenizers`
alone refuses rather than encode without the cut.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sllm.atomic import write_text_atomic
from sllm.errors import UserError
from sllm.fast_bpe import FastByteLevelBPE, fast_byte_level_bpe
from sllm.files import loads_json, read_text
from sllm.text import nfc

TOKENIZER_FILE = "tokenizer.json"
UNK_TOKEN = "<|unk|>"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
PRETOKENIZE_KEY = "sllm_pretokenize"
PRETOKENIZERS = ("none", "kiwi")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """U+FFFD for each lone surrogate (JSON escapes such as "\\ud800" put them into a str): UTF-8
    cannot hold one, so `tokenizers` would reject the text and hashing or saving it would fail."""
    return LONE_SURROGATE.sub("\ufffd", text)


def without_lone_surrogates(texts: list[str]) -> list[str]:
    """`replace_lone_surrogates` of each text, after one search of them all: most batches have none."""
    if LONE_SURROGATE.search("".join(texts)) is None:
        return texts
    return [replace_lone_surrogates(text) for text in texts]


class Tokenizer:
    """What the rest of sllm needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int
    separator = ""  # between a text and its decoded continuation: a space for words

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids generation never samples: padding (unless it is EOS), which a short run may not shun."""
        return () if self.pad_id == self.eos_id else (self.pad_id,)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids followed by EOS, in one array, and each text's length with its EOS:
        prepared data's layout, built without a Python list per document where the encoder can."""
        encoded = self.encode_batch(texts)
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        ended = itertools.chain.from_iterable((*ids, self.eos_id) for ids in encoded)
        return np.fromiter(ended, dtype=np.int64, count=int(lengths.sum())), lengths

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: Path) -> Path:
        """Write `tokenizer.json` into `directory` atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / TOKENIZER_FILE, self.to_json())
        return directory / TOKENIZER_FILE

    def _find_special_ids(self) -> None:
        """`eos_id` (required) and `pad_id` (EOS when there is no padding token)."""
        eos = _first_present(self, EOS_CANDIDATES)
        if eos is None:
            raise UserError(
                f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); "
                "add one to its special tokens"
            )
        pad = _first_present(self, PAD_CANDIDATES)
        self.eos_id, self.pad_id = eos, eos if pad is None else pad


class HFBackedTokenizer(Tokenizer):
    """A tokenizer that HF `tokenizers` runs: ours (BPE, word-level) or any tokenizer.json."""

    pretokenize = "none"  # or "kiwi": BPE only, see `sllm.morphemes`

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._find_special_ids()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = without_lone_surrogates(texts)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)


class BPETokenizer(HFBackedTokenizer):
    """Byte-level BPE; encodes through `tiktoken` on all cores when it gives the same ids."""

    def __init__(self, hf_tokenizer, pretokenize: str = "none") -> None:
        super().__init__(hf_tokenizer)
        self.pretokenize = pretokenize

    @functools.cached_property
    def fast(self) -> FastByteLevelBPE | None:
        """Built at the first encode: loading a tokenizer to decode needs none of it."""
        return fast_byte_level_bpe(self.hf, json.loads(self.hf.to_str()))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = without_lone_surrogates(texts)
        return self._encode_morphemes(texts) if self.pretokenize == "kiwi" else self._encode_plain(texts)

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.pretokenize == "kiwi" or self.fast is None:
            return super().encode_documents(texts)
        texts = without_lone_surrogates(texts)
        return self.fast.encode_documents(texts, self.eos_id)

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self.fast.encode_batch(texts) if self.fast is not None else super().encode_batch(texts)

    def _encode_morphemes(self, texts: list[str]) -> list[list[int]]:
        """Added tokens cut out first (the analyzer must not split one), the text between them cut at
        morphemes; all pieces are encoded in one call and joined per text."""
        from sllm.morphemes import morpheme_pieces

        parts = [self._added_split.split(nfc(text)) for text in texts]  # plain text at even places
        cut = iter(morpheme_pieces([plain for text in parts for plain in text[::2]]))
        pieces = [
            [*itertools.chain.from_iterable(next(cut) if i % 2 == 0 else [p] for i, p in enumerate(text))]
            for text in parts
        ]
        encoded = iter(self._encode_plain([piece for text in pieces for piece in text]))
        return [[*itertools.chain.from_iterable(itertools.islice(encoded, len(text)))] for text in pieces]

    @functools.cached_property
    def _added_split(self) -> re.Pattern:
        added = sorted(
            (t.content for t in self.hf.get_added_tokens_decoder().values()), key=len, reverse=True
        )
        return re.compile("(" + "|".join(map(re.escape, added)) + ")" if added else "(?!)")

    def to_json(self) -> str:
        if self.pretokenize == "none":
            return self.hf.to_str()
        return json.dumps(
            {**json.loads(self.hf.to_str()), PRETOKENIZE_KEY: self.pretokenize}, ensure_ascii=False
        )


class WordTokenizer(HFBackedTokenizer):
    """Whole words and punctuation marks (HF WordLevel), unknown ones `<|unk|>`; decoding joins
    tokens with spaces ("Hi, there." → "Hi , there ."). The classic exercise, not for real models."""

    separator = " "


class CharTokenizer(Tokenizer):
    """One token per NFC character: special tokens, then `<|unk|>`, then the sorted alphabet."""

    def __init__(self, special_tokens: list[str], chars: list[str]) -> None:
        self.special_tokens = list(special_tokens)
        self.chars = list(chars)
        self.itos = [*self.special_tokens, UNK_TOKEN, *self.chars]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.unk_id = len(self.special_tokens)
        self._find_special_ids()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_one(nfc(t)) for t in texts]

    def _encode_one(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.special_tokens if text.startswith(s, i)), None)
            if special is not None:
                ids.append(self.stoi[special])
                i += len(special)
            else:
                ids.append(self.stoi.get(text[i], self.unk_id))
                i += 1
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def to_json(self) -> str:
        payload = {"kind": "sllm-char", "special_tokens": self.special_tokens, "chars": self.chars}
        return json.dumps(payload, ensure_ascii=False)

    def token_id(self, token: str) -> int | None:
        return self.stoi.get(token)


def _first_present(tokenizer: Tokenizer, candidates: Iterable[str]) -> int | None:
    for token in candidates:
        token_id = tokenizer.token_id(token)
        if token_id is not None:
            return token_id
    return None


def train_bpe(
    texts: Iterator[str],
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int = 2,
    pretokenize: str = "none",
) -> BPETokenizer:
    """Byte-level BPE with NFC and the 256 bytes as base alphabet; `pretokenize="kiwi"` keeps merges
    inside morphemes."""
    _require_eos(special_tokens)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if pretokenize == "kiwi":
        from sllm.morphemes import training_pieces

        texts = training_pieces(texts)
    hf.train_from_iterator(_long_words_cut(texts), trainer=trainer)
    return BPETokenizer(hf, pretokenize)


LONG_WORD_CHUNK = re.compile(r"\S{256}")


def _long_words_cut(texts: Iterable[str]) -> Iterator[str]:
    """Each text cut every 256 characters inside longer runs without whitespace: the BPE trainer's
    time grows with the square of a word's length (a 2 MB one-letter line did not finish in 10 min)."""
    for text in texts:
        start = 0
        for match in LONG_WORD_CHUNK.finditer(text):
            yield text[start : match.end()]
            start = match.end()
        yield text[start:]


def train_word(
    texts: Iterator[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2
) -> WordTokenizer:
    """The `vocab_size` most frequent words (seen `min_frequency`+ times), special tokens, `<|unk|>`."""
    _require_eos(special_tokens)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    hf.normalizer = normalizers.NFC()
    split = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    hf.pre_tokenizer = pre_tokenizers.Sequence(split)
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*special_tokens, UNK_TOKEN],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return WordTokenizer(hf)


def _require_eos(special_tokens: list[str]) -> None:
    if not any(token in EOS_CANDIDATES for token in special_tokens):
        raise UserError(
            f"tokenizer.special_tokens needs an end-of-text token, one of {', '.join(EOS_CANDIDATES)}"
        )


def train_char(texts: Iterator[str], special_tokens: list[str]) -> CharTokenizer:
    _require_eos(special_tokens)
    alphabet: set[str] = set()
    for text in texts:
        alphabet.update(nfc(text))
    return CharTokenizer(special_tokens, sorted(alphabet))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` (or a directory holding one): ours, or any HF tokenizer file."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"tokenizer file {path} not found; train one with `sllm tokenizer train`")
    text = read_text(path, "train or copy the tokenizer again")
    try:
        payload = loads_json(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not a tokenizer.json file (invalid JSON: {exc.msg})") from None
    if isinstance(payload, dict) and payload.get("kind") == "sllm-char":
        lists = [payload.get("special_tokens"), payload.get("chars")]
        if not all(isinstance(x, list) and all(isinstance(t, str) for t in x) for x in lists):
            raise UserError(f"{path} is damaged: special_tokens and chars must be lists of strings")
        return CharTokenizer(*lists)
    from tokenizers import Tokenizer as HFTokenizer

    model = payload.get("model") if isinstance(payload, dict) else None
    word_level = isinstance(model, dict) and model.get("type") == "WordLevel"
    pretokenize = payload.pop(PRETOKENIZE_KEY, "none") if isinstance(payload, dict) else "none"
    if pretokenize not in PRETOKENIZERS:
        raise UserError(
            f"{path} asks for the pre-tokenizer {pretokenize!r}; sllm knows {', '.join(PRETOKENIZERS)}"
        )
    try:
        hf = HFTokenizer.from_str(text if pretokenize == "none" else json.dumps(payload))
        return WordTokenizer(hf) if word_level else BPETokenizer(hf, pretokenize)
    except Exception as exc:
        raise UserError(f"{path} is not a tokenizer the `tokenizers` library can read: {exc}") from None
