"""Tokenizer quality by vocabulary size on Korean + English text from ../shared/data.

Trains byte-level BPE at each size on NSMC reviews (raw/10*.json) plus the first 90% of tiny
Shakespeare, then measures held-out text: NSMC raw/11*.json and the last 10% of Shakespeare.
Prints a markdown table (the one in docs/tokenizers.md). Run from the repository root:

    PYTHONPATH=src python benchmarks/tokenizer_vocab.py [--sizes 8000 16000 32000 50000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sllm.data.sources import ReadOptions, SourceStats, expand_inputs, read_documents
from sllm.tokenizer import train_bpe
from sllm.tokenizer_stats import measure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIALS = ["<|endoftext|>", "<|pad|>"]
HELD_OUT_SHARE = 0.1


def _reviews(pattern: str) -> list[str]:
    sources = expand_inputs([str(SHARED / "nsmc" / "raw" / pattern)])
    return list(read_documents(sources, ReadOptions(text_field="review"), SourceStats()))


def _shakespeare_lines() -> tuple[list[str], list[str]]:
    lines = (SHARED / "tinyshakespeare" / "input.txt").read_text("utf-8").splitlines()
    cut = int(len(lines) * (1 - HELD_OUT_SHARE))
    return lines[:cut], lines[cut:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 16000, 32000, 50000])
    args = parser.parse_args()
    english_train, english_test = _shakespeare_lines()
    train_texts = _reviews("10*.json") + english_train
    test_texts = _reviews("11*.json") + english_test
    train_mb = sum(len(t.encode()) for t in train_texts) / 1e6
    print(
        f"training text {train_mb:.1f} MB ({len(train_texts):,} lines); held-out {len(test_texts):,} lines\n"
    )
    print(
        "| vocab | train s | ko tok/char | ko tok/word | en tok/char | en tok/word "
        "| ko fallback | en fallback | vocab used |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        started = time.perf_counter()
        tokenizer = train_bpe(iter(train_texts), size, SPECIALS)
        seconds = time.perf_counter() - started
        stats = measure(tokenizer, test_texts)
        ko, en = stats.groups["ko"], stats.groups["en"]
        print(
            f"| {tokenizer.vocab_size:,} | {seconds:.0f} | {ko.per('chars'):.3f} | {ko.per('words'):.2f} "
            f"| {en.per('chars'):.3f} | {en.per('words'):.2f} "
            f"| {ko.fallback_tokens / ko.tokens:.2%} | {en.fallback_tokens / en.tokens:.2%} "
            f"| {stats.vocab_used / stats.vocab_size:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
