"""`sllm data info`: a prepared data directory described in words, with sample windows.

Decoded windows are the quickest check that the model reads what you meant (the right field,
sane normalization, EOS between documents); the overview is also prepare's closing summary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sllm.data.meta import CleaningCounts, DataMeta
from sllm.data.verify import open_split
from sllm.tokenizer import load_tokenizer


def describe_data(data_dir: str | Path, show_samples: int = 0, window_tokens: int = 64, seed: int = 0) -> str:
    meta = DataMeta.read(data_dir)
    tokenizer = load_tokenizer(data_dir)
    lines = [
        f"{data_dir}: vocabulary {meta.vocab_size:,} tokens ({meta.dtype}), EOS id {meta.eos_id}, "
        f"tokenizer sha256 {meta.tokenizer_sha256[:12]}",
        *overview_lines(meta),
    ]
    inputs = meta.input_files()
    lines.append(f"  sources ({len(inputs)}): " + ", ".join(i.path for i in inputs[:5]))
    if len(inputs) > 5:
        lines[-1] += f", … {len(inputs) - 5} more"
    tokens = open_split(data_dir, "train", meta)
    rng = np.random.default_rng(seed)
    width = min(window_tokens, len(tokens))
    for number in range(show_samples if width else 0):
        start = int(rng.integers(0, len(tokens) - width + 1))
        text = tokenizer.decode(tokens[start : start + width].tolist())
        lines.append(f"\n--- train window {number + 1}: tokens {start:,}–{start + width:,} ---\n{text}")
    return "\n".join(lines)


def overview_lines(meta: DataMeta) -> list[str]:
    """Each split's and source's size and share; what reading skipped and cleaning changed, by reason."""
    lines = []
    for split, counts in meta.splits.items():
        if counts.documents:
            shards = len(meta.shards[split])
            lines.append(
                f"  {split:<5} {counts.documents:>9,} documents {counts.tokens:>12,} tokens "
                f"{counts.bytes:>13,} bytes ({counts.bytes / counts.tokens:.2f} bytes/token) "
                f"in {shards} shard{'s' if shards > 1 else ''}"
            )
    for source in meta.sources if len(meta.sources) > 1 else []:
        counts = source.splits.values()
        documents, tokens = sum(c.documents for c in counts), sum(c.tokens for c in counts)
        lines.append(
            f"  source {source.name}: {documents:,} documents, {tokens:,} tokens ({source.split}), "
            f"train share {source.natural_share:.1%}, sampled {source.sampling_share:.1%}"
        )
    cleaning = meta.cleaning or CleaningCounts(kept=0, changed={}, dropped={})
    sections = {"skipped": meta.skipped, "dropped": cleaning.dropped, "changed": cleaning.changed}
    for label, counts in sections.items():
        listed = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in counts.items() if n)
        if listed:
            lines.append(f"  {label + ':':<8} {listed}")
    return lines
