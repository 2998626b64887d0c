"""Raw text → prepared data directory: tokenizer.json, train/val/test .bin files, meta.json.

Documents are cleaned (sllm.data.clean: NFC and the configured rewrites and filters, each
counted in meta.json), split by a seeded draw per document (so a document never straddles
splits), encoded in batches (the tokenizer's Rust threads use every core) and joined
with EOS. Token files are flat uint16 arrays when the vocabulary fits, else uint32.

meta.json keeps a fingerprint of the inputs (content sha256), the tokenizer and the
settings: re-running on unchanged inputs does nothing, anything changed rebuilds. Work
happens in a temp directory that is renamed into place at the end, so an interrupted
prepare never leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sllm.atomic import ensure_writable_dir, recover_dir, replace_dir, temp_path
from sllm.config import DataConfig, TokenizerConfig
from sllm.data.clean import Cleaner, CleanReport
from sllm.data.sources import HFDataset, Input, ReadOptions, SourceStats, expand_inputs, read_documents
from sllm.errors import UserError
from sllm.tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
ENCODE_BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    return digest.hexdigest()


def train_tokenizer(files: list[Input], data: DataConfig, tok: TokenizerConfig) -> Tokenizer:
    """Train the configured kind of tokenizer on the cleaned documents of `files`."""
    stats = SourceStats()
    cleaner = Cleaner(data)
    texts = cleaner(read_documents(files, ReadOptions.from_config(data), stats))
    if tok.kind == "char":
        tokenizer: Tokenizer = train_char(texts, tok.special_tokens)
    else:
        tokenizer = train_bpe(texts, tok.vocab_size, tok.special_tokens, tok.min_frequency)
    _require_kept_documents(stats, cleaner.report)
    return tokenizer


def _require_kept_documents(stats: SourceStats, report: CleanReport) -> None:
    if stats.documents == 0:
        raise UserError("the corpus has no non-empty documents; check the input files")
    if report.kept == 0:
        reasons = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in report.dropped.items())
        raise UserError(
            f"cleaning dropped all {stats.documents:,} documents ({reasons}); "
            "loosen data.min_chars, data.max_chars or data.language"
        )


def _input_fingerprint(source: Input) -> dict[str, Any]:
    """Content hash of a file, or of every file of a local `hf:` dataset dir; a hub name as is."""
    if isinstance(source, HFDataset):
        local = Path(source.name)
        if not local.is_dir():
            return {"path": str(source)}
        files = sorted(p for p in local.rglob("*") if p.is_file())
        return {"path": str(source), "files": [_input_fingerprint(p) for p in files]}
    return {"path": str(source), "bytes": source.stat().st_size, "sha256": file_sha256(source)}


def _fingerprint(
    files: list[Input], data: DataConfig, tok: TokenizerConfig, given: Tokenizer | None
) -> dict[str, Any]:
    """What the output depends on: input contents, the tokenizer (or its recipe), settings."""
    tokenizer_key: dict[str, Any]
    if given is not None:
        tokenizer_key = {"file_sha256": given.sha256}
    else:
        tokenizer_key = {"train": {k: v for k, v in dataclasses.asdict(tok).items() if k != "path"}}
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("dir", "inputs")}
    inputs = [_input_fingerprint(source) for source in files]
    return {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "tokenizer": tokenizer_key,
        "settings": settings,
    }


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data directory (no meta.json); run `sllm prepare`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is damaged (invalid JSON); run `sllm prepare` again") from None


def _split_of(draws: np.ndarray, val_ratio: float, test_ratio: float) -> Iterator[str]:
    for u in draws:
        yield "val" if u < val_ratio else "test" if u < val_ratio + test_ratio else "train"


def _write_splits(
    documents: Iterator[str], tokenizer: Tokenizer, data: DataConfig, out: Path
) -> dict[str, dict[str, int]]:
    """Encode documents in batches and append them, EOS after each, to their split's file."""
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    handles = {s: open(out / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115
    rng = np.random.default_rng(data.split_seed)
    try:
        batch: list[str] = []
        for text in documents:
            batch.append(text)
            if len(batch) == ENCODE_BATCH_DOCS:
                _flush(batch, rng, tokenizer, data, dtype, handles, counts)
                batch = []
        _flush(batch, rng, tokenizer, data, dtype, handles, counts)
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def _flush(batch, rng, tokenizer, data, dtype, handles, counts) -> None:
    if not batch:
        return
    splits = list(_split_of(rng.random(len(batch)), data.val_ratio, data.test_ratio))
    for text, ids, split in zip(batch, tokenizer.encode_batch(batch), splits, strict=True):
        ids.append(tokenizer.eos_id)
        np.asarray(ids, dtype=dtype).tofile(handles[split])
        counts[split]["documents"] += 1
        counts[split]["tokens"] += len(ids)
        counts[split]["bytes"] += len(text.encode("utf-8"))


def _check_splits(counts: dict[str, dict[str, int]], data: DataConfig) -> None:
    total_docs = sum(c["documents"] for c in counts.values())
    if total_docs == 0:
        raise UserError("the corpus is empty: no non-empty documents in the inputs")
    wanted = {"train": 1.0, "val": data.val_ratio, "test": data.test_ratio}
    for split, ratio in wanted.items():
        if ratio > 0 and counts[split]["documents"] == 0:
            raise UserError(
                f"the {split} split got no documents out of {total_docs}; give more documents "
                "(e.g. data.txt_mode=paragraph), raise its ratio or change data.split_seed"
            )


def prepare(data: DataConfig, tok: TokenizerConfig, log=print) -> dict[str, Any]:
    """Build (or confirm up to date) the prepared data directory `data.dir`; return its meta."""
    out = Path(data.dir)
    files = expand_inputs(data.inputs)
    ensure_writable_dir(out.parent, "prepared data")
    recover_dir(out)
    given = load_tokenizer(tok.path) if tok.path else None
    fingerprint = _fingerprint(files, data, tok, given)
    if (out / META_FILE).is_file():
        existing = read_meta(out)
        if existing.get("fingerprint") == fingerprint:
            log(f"{out} is up to date with its inputs; nothing to do")
            return existing
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a prepared data directory; choose another --out")

    started = time.perf_counter()
    tokenizer = given or train_tokenizer(files, data, tok)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        tokenizer.save(tmp)
        stats = SourceStats()
        cleaner = Cleaner(data)
        documents = cleaner(read_documents(files, ReadOptions.from_config(data), stats))
        counts = _write_splits(documents, tokenizer, data, tmp)
        _require_kept_documents(stats, cleaner.report)
        _check_splits(counts, data)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tokenizer.sha256,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "splits": counts,
            "skipped": {
                "empty_documents": stats.empty_documents,
                "malformed_lines": stats.malformed_lines,
                "invalid_utf8_lines": stats.invalid_utf8_lines,
            },
            "cleaning": cleaner.report.as_dict(),
            "fingerprint": fingerprint,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), "utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(summary(meta, time.perf_counter() - started))
    return meta


def summary(meta: dict[str, Any], seconds: float) -> str:
    lines = [f"prepared in {seconds:.1f}s: vocab {meta['vocab_size']}, dtype {meta['dtype']}"]
    for split, c in meta["splits"].items():
        if c["documents"]:
            lines.append(
                f"  {split:<5} {c['documents']:>9,} documents {c['tokens']:>12,} tokens "
                f"{c['bytes'] / max(c['tokens'], 1):.2f} bytes/token"
            )
    skipped = {k: v for k, v in meta["skipped"].items() if v}
    if skipped:
        lines.append("  skipped: " + _counts_line(skipped))
    cleaning = meta.get("cleaning", {})
    for label in ("dropped", "changed"):
        if cleaning.get(label):
            lines.append(f"  {label + ':':<8} {_counts_line(cleaning[label])}")
    return "\n".join(lines)


def _counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items())
