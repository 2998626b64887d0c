"""Encode GPT-2-style byte-level BPE with `tiktoken`, 3-4x faster per core than `tokenizers`.

`tokenizers` trains our BPE and owns the file; `tiktoken` takes only a tokenizer it reproduces
exactly: NFC or no normalizer, the GPT-2 byte-level split, a plain BPE whose merges create every
multi-byte token in id order (tiktoken ranks a merge by the id it creates, HF by position) and
rebuild each token from its own text, all 256 bytes, special tokens only, no padding or
truncation. Anything else keeps `tokenizers`. tests/test_fast_bpe.py checks equal ids.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

TEXT_END = "\U0010ffff"  # a noncharacter: text should never hold one (a batch that does is still exact)
PARALLEL_MIN_CHARS = 1 << 12  # below this a batch is encoded on one thread: handing it out costs more
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE = "Hello, world! 한국어는 NFC로 ᄒᆞᆫ글 123 4.5e6 it's\n\n  tabs\tand  spaces 😀 ﬁ café"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of the byte-level alphabet (printable bytes as themselves, others from U+0100)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(others)}


class FastByteLevelBPE:
    """`tiktoken` encoding of one qualifying HF tokenizer; `encode_batch` gives HF's ids. Like
    `tokenizers`, it cuts special tokens out first (longest first), then normalizes and encodes.

    A batch is joined into one string with TEXT_END after each text, a special token of this
    encoding only: `tiktoken` encodes the text between specials on its own, so each text gets its
    own ids, at a fraction of the cost of one call per text (short documents are mostly call
    overhead). Special tokens in the text are cut out first; a batch holding TEXT_END itself is
    encoded text by text."""

    def __init__(self, encoding: Any, nfc: bool, special_ids: dict[str, int], end_id: int) -> None:
        self.encoding, self.nfc, self.special_ids, self.end_id = encoding, nfc, special_ids, end_id
        longest_first = sorted(special_ids, key=len, reverse=True)
        self.special_split = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if special_ids else None
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self._each_text(self._encode_ended(texts))]

    def encode_documents(self, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids followed by `eos_id`, in one array, and each text's length with it."""
        ended = self._encode_ended(texts)
        is_end = ended == self.end_id
        return np.where(is_end, eos_id, ended), np.diff(np.flatnonzero(is_end), prepend=-1)

    def _each_text(self, ended: np.ndarray) -> list[np.ndarray]:
        """`_encode_ended`'s result cut back into each text's ids."""
        ends = np.flatnonzero(ended == self.end_id)
        starts = np.concatenate(([0], ends + 1))[:-1]
        return [ended[start:end] for start, end in zip(starts, ends, strict=True)]

    def _encode_ended(self, texts: list[str]) -> np.ndarray:
        """The ids of `texts` with `end_id` after each, on every thread for a large batch."""
        if not texts:
            return np.empty(0, dtype=np.uint32)
        joined = TEXT_END.join(texts)
        if self.special_split and self.special_split.search(joined):
            return self._encode_around_specials(texts)
        if joined.count(TEXT_END) >= len(texts):  # a text holds TEXT_END itself
            return self._encode_each(texts)
        if self.nfc and not unicodedata.is_normalized("NFC", joined):
            texts = [self._normalize(text) for text in texts]
        workers = threads() if len(joined) >= PARALLEL_MIN_CHARS else 1
        if workers == 1 or len(texts) < workers:
            return self._encode_joined(texts)
        step = -(-len(texts) // workers)
        groups = [texts[first : first + step] for first in range(0, len(texts), step)]
        return np.concatenate(list(_pool(workers).map(self._encode_joined, groups)))

    def _encode_joined(self, texts: list[str]) -> np.ndarray:
        joined = TEXT_END.join(texts) + TEXT_END
        return self.encoding.encode_to_numpy(joined, allowed_special={TEXT_END}, disallowed_special=())

    def _encode_around_specials(self, texts: list[str]) -> np.ndarray:
        """Special tokens cut out of each text first; the plain parts of all texts encoded together."""
        parts = [self.special_split.split(text) for text in texts]  # plain parts at even places
        plain = iter(self._each_text(self._encode_ended([p for pieces in parts for p in pieces[::2]])))
        ended: list[np.ndarray | list[int]] = []
        for pieces in parts:
            ended += [[self.special_ids[p]] if place % 2 else next(plain) for place, p in enumerate(pieces)]
            ended.append([self.end_id])
        return np.concatenate(ended).astype(np.uint32)

    def _encode_each(self, texts: list[str]) -> np.ndarray:
        """`_encode_ended` one text at a time, for texts holding TEXT_END (encoded as plain text)."""
        ids: list[int] = []
        for text in texts:
            ids += self.encoding.encode_ordinary(self._normalize(text))
            ids.append(self.end_id)
        return np.asarray(ids, dtype=np.uint32)

    def _normalize(self, text: str) -> str:
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per thread count for the process: `tiktoken` releases the GIL while it encodes."""
    return ThreadPoolExecutor(workers, thread_name_prefix="bpe")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the threads


def threads() -> int:
    """Encoding threads as `tokenizers` counts them (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS)."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "off", "no"):
        return 1
    configured = os.environ.get("RAYON_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fast_byte_level_bpe(hf_tokenizer: Any, spec: dict) -> FastByteLevelBPE | None:
    """A `tiktoken` encoder giving exactly `hf_tokenizer`'s ids, or None when it would not."""
    try:
        import tiktoken
    except ImportError:
        return None
    added = spec.get("added_tokens") or []
    specials = {token["content"]: token["id"] for token in added}
    ranks = _mergeable_ranks(spec, set(specials))
    normalizer = spec.get("normalizer")
    nfc = normalizer is not None  # anything but NFC or none keeps `tokenizers`
    plain_specials = all(
        t.get("special") and not any(t.get(k) for k in ("single_word", "lstrip", "rstrip", "normalized"))
        for t in added
    )
    if (
        ranks is None
        or (nfc and normalizer.get("type") != "NFC")
        or not _gpt2_pre_tokenizer(spec)
        or not plain_specials
        or spec.get("padding") or spec.get("truncation")
        or getattr(hf_tokenizer, "encode_special_tokens", False)
        or not _merges_rebuild_every_token(hf_tokenizer, ranks)
    ):  # fmt: skip
        return None
    end_id = max([*ranks.values(), *specials.values()]) + 1
    encoding = tiktoken.Encoding(
        "sllm-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={**specials, TEXT_END: end_id}
    )
    fast = FastByteLevelBPE(encoding, nfc, specials, end_id)
    expected = hf_tokenizer.encode(PROBE, add_special_tokens=False).ids
    return fast if fast.encode_batch([PROBE]) == [expected] else None


def _mergeable_ranks(spec: dict, specials: set[str]) -> dict[bytes, int] | None:
    """Token bytes -> id, when the ids order the tokens as the merges create them."""
    model = spec.get("model") or {}
    plain_bpe = model.get("type") == "BPE" and not any(
        model.get(key) for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                   "byte_fallback", "ignore_merges")
    )  # fmt: skip
    if not plain_bpe:
        return None
    to_byte = _unicode_to_byte()
    vocab = {token: index for token, index in model["vocab"].items() if token not in specials}
    if any(ch not in to_byte for token in vocab for ch in token):
        return None
    merged = ["".join(m.split(" ", 1) if isinstance(m, str) else m) for m in model.get("merges") or []]
    merged_ids = [vocab.get(token, -1) for token in merged]
    singles = [token for token in vocab if len(token) == 1]
    in_merge_order = all(a < b for a, b in itertools.pairwise(merged_ids))
    complete = (
        len(singles) == 256
        and len(singles) + len(set(merged)) == len(vocab)
        and min(merged_ids, default=0) >= 0
    )
    if not (in_merge_order and complete):
        return None
    return {bytes(to_byte[ch] for ch in token): index for token, index in vocab.items()}


def _merges_rebuild_every_token(hf_tokenizer: Any, ranks: dict[bytes, int]) -> bool:
    """Whether `tokenizers` turns each token's own text into that token: `tiktoken` joins any two
    neighbours that make a token, `tokenizers` only listed merges (merges "b c", "a b", "ab c": "abc"
    stays a + bc). BPEs trained by `tokenizers` pass."""
    to_text = {index: token for token, index in hf_tokenizer.get_vocab(with_added_tokens=False).items()}
    return all(
        [piece.id for piece in hf_tokenizer.model.tokenize(to_text[index])] == [index]
        for token_bytes, index in ranks.items()
        if len(token_bytes) > 1
    )


def _gpt2_pre_tokenizer(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor")
    byte_level = (
        pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    )
    return byte_level and (post is None or post.get("type") == "ByteLevel")
