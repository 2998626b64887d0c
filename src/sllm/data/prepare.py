"""Raw text → prepared data directory: tokenizer.json, token shards per split, meta.json.

Documents are read source by source, cleaned, split by a seeded draw per document (or their
held-out source), encoded in batches and joined with EOS into shards; a background thread reads
and cleans while the tokenizer encodes the previous batch on every core. meta.json fingerprints
inputs, tokenizer and settings, so an unchanged rerun does nothing. Work happens in a hidden
directory renamed into place at the end; its `progress.json` lets an interrupted prepare resume
to the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sllm.atomic import (
    carry_over,
    ensure_writable_dir,
    recover_dir,
    replace_dir,
    write_text_atomic,
    writing_to,
)
from sllm.config import DataConfig, TokenizerConfig
from sllm.data.clean import Cleaner, CleanReport
from sllm.data.inspect import overview_lines
from sllm.data.meta import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    CleaningCounts,
    DataMeta,
    SourceEntry,
    SplitCounts,
    token_dtype,
)
from sllm.data.mixture import Source, held_out_splits, resolve_sources
from sllm.data.prefetch import prefetched
from sllm.data.shards import ShardWriter
from sllm.data.sources import HFDataset, Input, SourceStats, read_documents
from sllm.errors import UserError
from sllm.files import loads_json, sha256_file
from sllm.progress import progress_bar
from sllm.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, train_bpe, train_char, train_word

PROGRESS_FILE = "progress.json"
PARTIAL_MARK = ".partial"
PROGRESS_INTERVAL_S = 30.0
ENCODE_BATCH_DOCS = 512  # documents per split draw and per resume step
ENCODE_GROUP_CHARS = 1 << 18
TRAIN, VAL, TEST = (SPLITS.index(split) for split in ("train", "val", "test"))
OUR_SHARD = re.compile(rf"({'|'.join(SPLITS)})(-\d+)?\.bin")


def file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check its permissions") from None


def train_tokenizer(sources: list[Source], data: DataConfig, tok: TokenizerConfig, log=print) -> Tokenizer:
    """Train the configured tokenizer on the first `tok.sample_bytes` of cleaned text, one document
    from each source in turn; logs why when the vocabulary is not the requested size."""
    stats = SourceStats()
    cleaner = Cleaner(data)
    streams = [cleaner(read_documents(s.files, s.options, stats)) for s in sources]
    file_bytes = [
        f.stat().st_size if isinstance(f, Path) else tok.sample_bytes for s in sources for f in s.files
    ]
    total = min(tok.sample_bytes, sum(file_bytes))  # about the text's bytes: the bar may end short of it
    with progress_bar(
        desc="tokenizer sample", total=total, unit="B", unit_scale=True, unit_divisor=1024
    ) as bar:
        texts = _counted(_interleaved_sample(streams, tok.sample_bytes), bar)
        if tok.kind == "char":
            tokenizer: Tokenizer = train_char(texts, tok.special_tokens)
        elif tok.kind == "word":
            tokenizer = train_word(texts, tok.vocab_size, tok.special_tokens, tok.min_frequency)
        else:
            tokenizer = train_bpe(
                texts, tok.vocab_size, tok.special_tokens, tok.min_frequency, tok.pretokenize
            )
    _require_kept_documents(stats, cleaner.report)
    note = _vocab_size_note(tokenizer, tok)
    if note:
        log(note)
    return tokenizer


def _counted(texts: Iterator[str], bar: tqdm) -> Iterator[str]:
    """`texts`, their UTF-8 bytes counted on `bar`. Its label then says that the trainer is at
    work: HF's trainer draws bars of its own only without ETA and over ours, so it draws none."""
    for text in texts:
        bar.update(len(text.encode("utf-8")))
        yield text
    bar.total = bar.n  # the estimate from file sizes, made exact
    bar.set_description("tokenizer sample read; training", refresh=True)


def _vocab_size_note(tokenizer: Tokenizer, tok: TokenizerConfig) -> str | None:
    """Why the trained vocabulary differs from `tok.vocab_size` (char: only when one was set)."""
    size, requested = tokenizer.vocab_size, tok.vocab_size
    if tok.kind == "char":
        if requested == TokenizerConfig.vocab_size or size == requested:
            return None
        return (
            f"--vocab-size (tokenizer.vocab_size) {requested:,} does not apply to the char kind: "
            f"its {size:,} tokens are the characters seen plus the special tokens"
        )
    if size < requested and tok.kind == "word":
        return (
            f"the corpus has only {size:,} tokens (words seen {tok.min_frequency}+ times, special tokens "
            f"and <|unk|>) of the requested {requested:,}; give more text or a smaller --vocab-size"
        )
    if size < requested:
        return (
            f"the corpus supported only {size:,} of the requested {requested:,} BPE tokens (the merges ran "
            f"out: no pair is left that occurs {tok.min_frequency}+ times); give more text or a smaller "
            "--vocab-size"
        )
    return None


def _interleaved_sample(streams: list[Iterator[str]], limit_bytes: int) -> Iterator[str]:
    """Documents round-robin over `streams` until `limit_bytes` of UTF-8 text were given."""
    active, taken = list(streams), 0
    while active and taken < limit_bytes:
        for stream in list(active):
            text = next(stream, None)
            if text is None:
                active.remove(stream)
                continue
            taken += len(text.encode("utf-8"))
            yield text
            if taken >= limit_bytes:
                return


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
    sources: list[Source], data: DataConfig, tok: TokenizerConfig, given: Tokenizer | None
) -> dict[str, Any]:
    """What the output depends on: input contents, the tokenizer (or its recipe), settings."""
    recipe = {k: v for k, v in dataclasses.asdict(tok).items() if k != "path"}
    tokenizer_key = {"train": recipe} if given is None else {"file_sha256": given.sha256}
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("dir", "inputs")}
    inputs = [_input_fingerprint(file) for source in sources for file in source.files]
    return {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "tokenizer": tokenizer_key,
        "settings": settings,
    }


def _zero_counts() -> dict[str, dict[str, int]]:
    return {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}


@dataclass
class Progress:
    """How far a prepare got, saved after each shard and every PROGRESS_INTERVAL_S, to resume from."""

    fingerprint: dict[str, Any]
    batches_done: int = 0
    counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=_zero_counts)
    source_counts: list[dict[str, dict[str, int]]] = dataclasses.field(default_factory=list)

    def save(self, work: Path) -> None:
        write_text_atomic(work / PROGRESS_FILE, json.dumps(dataclasses.asdict(self), ensure_ascii=False))

    @classmethod
    def load(cls, work: Path, fingerprint: dict[str, Any]) -> Progress | None:
        """The saved progress if it belongs to the same inputs and settings, else None."""
        try:
            saved = cls(**loads_json((work / PROGRESS_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return saved if saved.fingerprint == fingerprint else None


class SplitAssigner:
    """Each document's split (an index into SPLITS): a seeded draw per document of a batch (the same
    when resumed), or its held-out source's split."""

    def __init__(self, data: DataConfig, sources: list[Source]) -> None:
        held_out = held_out_splits(sources)
        self.seed = data.split_seed
        self.val_ratio = 0.0 if "val" in held_out else data.val_ratio
        self.test_ratio = 0.0 if "test" in held_out else data.test_ratio
        self.fixed = np.array([SPLITS.index(s.split) if s.split != "auto" else -1 for s in sources])

    def __call__(self, batch_number: int, sources: np.ndarray) -> np.ndarray:
        """The splits of a batch's documents, given the index of each one's source."""
        draws = np.random.default_rng([self.seed, batch_number]).random(len(sources))
        drawn = np.where(
            draws < self.val_ratio, VAL, np.where(draws < self.val_ratio + self.test_ratio, TEST, TRAIN)
        )
        fixed = self.fixed[sources]
        return np.where(fixed >= 0, fixed, drawn)


def _cleaned_batches(
    sources: list[Source], cleaner: Cleaner, stats: SourceStats
) -> Iterator[list[tuple[int, str]]]:
    """(source index, cleaned text) in batches of ENCODE_BATCH_DOCS, sources one after another."""
    documents = (
        (index, text)
        for index, source in enumerate(sources)
        for text in cleaner(read_documents(source.files, source.options, stats))
    )
    return iter(lambda: list(itertools.islice(documents, ENCODE_BATCH_DOCS)), [])


Batch = tuple[int, list[tuple[int, str]]]  # (batch number, [(source index, text), ...])


def _groups(batches: Iterator[list[tuple[int, str]]], first: int) -> Iterator[list[Batch]]:
    """The numbered batches from number `first` on (earlier ones were written before an
    interruption), gathered until a group holds ENCODE_GROUP_CHARS characters: the encoder's
    threads then wait for the GIL once per group, not once per batch of short documents."""
    group: list[Batch] = []
    chars = 0
    for number, batch in enumerate(batches):
        if number < first:
            continue
        group.append((number, batch))
        chars += sum(len(text) for _, text in batch)
        if chars >= ENCODE_GROUP_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


class SplitWriter:
    """Encodes batches into each split's shards (EOS after each document) and keeps the counts."""

    def __init__(
        self, work: Path, tokenizer: Tokenizer, sources: list[Source], data: DataConfig, progress: Progress
    ) -> None:
        self.work, self.tokenizer, self.progress = work, tokenizer, progress
        self.assign = SplitAssigner(data, sources)
        dtype = token_dtype(tokenizer.vocab_size)
        if not progress.source_counts:
            progress.source_counts = [_zero_counts() for _ in sources]
        self.shards = {
            s: ShardWriter(work, s, dtype, data.shard_tokens, progress.counts[s]["tokens"]) for s in SPLITS
        }
        self.saved_at = time.monotonic()

    def write(self, group: list[Batch]) -> tuple[int, int]:
        """Encode and write a group of batches; the tokens and the text bytes it added."""
        numbers, batches = zip(*group, strict=True)
        sources, texts = zip(*itertools.chain.from_iterable(batches), strict=True)
        source_array = np.asarray(sources, dtype=np.int64)
        per_batch = np.split(source_array, np.cumsum([len(batch) for batch in batches])[:-1])
        splits = np.concatenate([self.assign(n, s) for n, s in zip(numbers, per_batch, strict=True)])
        tokens, lengths = self.tokenizer.encode_documents(list(texts))
        sizes = np.fromiter(map(len, map(str.encode, texts)), dtype=np.int64, count=len(texts))
        finished_before = sum(w.finished_shards for w in self.shards.values())
        token_splits = np.repeat(splits, lengths)
        for code, split in enumerate(SPLITS):
            if (chosen := splits == code).any():
                self.shards[split].write(tokens[token_splits == code])
                for source in np.unique(source_array[chosen]):
                    of_source = chosen & (source_array == source)
                    self._count(self.progress.source_counts[source][split], of_source, lengths, sizes)
                self._count(self.progress.counts[split], chosen, lengths, sizes)
        self.progress.batches_done = numbers[-1] + 1
        finished = sum(w.finished_shards for w in self.shards.values())
        if finished > finished_before or time.monotonic() - self.saved_at > PROGRESS_INTERVAL_S:
            self.save_progress()
        return int(lengths.sum()), int(sizes.sum())

    @staticmethod
    def _count(counts: dict[str, int], chosen: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> None:
        counts["documents"] += int(chosen.sum())
        counts["tokens"] += int(lengths[chosen].sum())
        counts["bytes"] += int(sizes[chosen].sum())

    def save_progress(self) -> None:
        for shards in self.shards.values():
            shards.sync()
        self.progress.save(self.work)
        self.saved_at = time.monotonic()

    def close(self) -> dict[str, list[str]]:
        return {split: shards.close() for split, shards in self.shards.items()}


def _check_splits(counts: dict[str, dict[str, int]], data: DataConfig, held_out: set[str]) -> None:
    total_docs = sum(c["documents"] for c in counts.values())
    if total_docs == 0:
        raise UserError("the corpus is empty: no non-empty documents in the inputs")
    for split in sorted(held_out):
        if counts[split]["documents"] == 0:
            raise UserError(f"the held-out {split} files gave no documents; check data.{split}_inputs")
    wanted = {"train": 1.0, "val": data.val_ratio, "test": data.test_ratio}
    for split, ratio in wanted.items():
        if ratio > 0 and split not in held_out and counts[split]["documents"] == 0:
            raise UserError(
                f"the {split} split got no documents out of {total_docs}; give more documents "
                "(e.g. data.txt_mode=paragraph), raise its ratio or change data.split_seed"
            )


def work_path(out: Path) -> Path:
    """Where an unfinished prepare of `out` lives; it survives interruptions, to be resumed."""
    return out.parent / f".{out.name}{PARTIAL_MARK}"


def prepare(data: DataConfig, tok: TokenizerConfig, log=print) -> DataMeta:
    """Build (or confirm up to date, or resume) the prepared data directory `data.dir`."""
    out = Path(data.dir)
    sources = resolve_sources(data)
    ensure_writable_dir(out.parent, "prepared data")
    recover_dir(out)
    given = load_tokenizer(tok.path) if tok.path else None
    fingerprint = _fingerprint(sources, data, tok, given)
    if (out / META_FILE).is_file():
        existing = _existing_meta(out, log)
        if existing is not None and existing.fingerprint == fingerprint:
            log(f"{out} is up to date with its inputs; nothing to do")
            return existing
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a prepared data directory; choose another --out")

    started = time.perf_counter()
    work = work_path(out)
    with writing_to(out.parent, "prepared data"):  # a full disk keeps `work`, to be resumed
        try:
            writer = _resume(work, sources, data, log, fingerprint)
            if writer is None:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                tokenizer = given or train_tokenizer(sources, data, tok, log)
                tokenizer.save(work)
                progress = Progress(fingerprint)
                progress.save(work)
                writer = SplitWriter(work, tokenizer, sources, data, progress)
            meta = _write_all(writer, sources, data, out.name)
        except UserError:
            shutil.rmtree(work, ignore_errors=True)  # the input is at fault: nothing worth resuming
            raise
        carry_over(out, work, _is_ours)  # a user's own files in `out` stay
        replace_dir(work, out)
    log(summary(meta, time.perf_counter() - started))
    return meta


def _is_ours(name: str) -> bool:
    """Whether a file of a prepared data directory is one prepare writes (and may replace)."""
    return name in (META_FILE, TOKENIZER_FILE, PROGRESS_FILE) or bool(OUR_SHARD.fullmatch(name))


def _existing_meta(out: Path, log) -> DataMeta | None:
    """A previous prepare's meta.json, or None with the reason (the directory is then rebuilt)."""
    try:
        return DataMeta.read(out)
    except UserError as exc:
        log(f"rebuilding: {exc}")
        return None


def _resume(
    work: Path, sources: list[Source], data: DataConfig, log, fingerprint: dict[str, Any]
) -> SplitWriter | None:
    """A writer that continues the interrupted prepare in `work`, or None to start afresh."""
    progress = Progress.load(work, fingerprint)
    if progress is None:
        return None
    try:
        writer = SplitWriter(work, load_tokenizer(work), sources, data, progress)
    except (ValueError, OSError, UserError):
        log(f"the interrupted prepare in {work} is inconsistent; starting over")
        return None
    log(f"resuming the interrupted prepare after {progress.batches_done * ENCODE_BATCH_DOCS:,} documents")
    return writer


def _write_all(writer: SplitWriter, sources: list[Source], data: DataConfig, name: str) -> DataMeta:
    """Read, clean, encode and write every document (batches written before an interruption are
    cleaned again, for the dedup state, but not encoded); then write meta.json."""
    stats = SourceStats()
    cleaner = Cleaner(data)
    progress = writer.progress
    bar = progress_bar(desc=f"prepare {name}", unit="B", unit_scale=True, unit_divisor=1024)
    started, tokens = time.perf_counter(), 0
    with bar:
        batches = _cleaned_batches(sources, cleaner, stats)
        for group in prefetched(_groups(batches, progress.batches_done), depth=2):
            added_tokens, added_bytes = writer.write(group)
            tokens += added_tokens
            bar.update(added_bytes)
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            written = sum(c["documents"] for c in progress.counts.values())
            bar.set_postfix(documents=f"{written:,}", tokens_per_s=f"{rate:,.0f}", refresh=False)
    shards = writer.close()
    _require_kept_documents(stats, cleaner.report)
    _check_splits(progress.counts, data, held_out_splits(sources))
    tokenizer = writer.tokenizer
    meta = DataMeta(
        format_version=FORMAT_VERSION,
        tokenizer_sha256=tokenizer.sha256,
        dtype=token_dtype(tokenizer.vocab_size).name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        splits=_split_counts(progress.counts),
        shard_tokens=data.shard_tokens,
        shards=shards,
        sources=_source_entries(sources, progress.source_counts),
        skipped={
            "empty_documents": stats.empty_documents,
            "malformed_lines": stats.malformed_lines,
            "invalid_utf8_lines": stats.invalid_utf8_lines,
        },
        cleaning=CleaningCounts(
            cleaner.report.kept, dict(cleaner.report.changed), dict(cleaner.report.dropped)
        ),
        fingerprint=progress.fingerprint,
        checksums={name: sha256_file(writer.work / name) for names in shards.values() for name in names},
    )
    meta.write(writer.work)
    (writer.work / PROGRESS_FILE).unlink()
    return meta


def _split_counts(counts: dict[str, dict[str, int]]) -> dict[str, SplitCounts]:
    return {split: SplitCounts(**c) for split, c in counts.items()}


def _source_entries(sources: list[Source], counts: list[dict[str, dict[str, int]]]) -> list[SourceEntry]:
    """Per source: its counts, its train token range and its share of training windows."""
    train_tokens = [c["train"]["tokens"] for c in counts]
    total = max(sum(train_tokens), 1)
    weights = [s.weight if s.split in ("auto", "train") else 0.0 for s in sources]
    weighted = sum(weights) > 0
    entries, begin = [], 0
    for source, count, tokens, weight in zip(sources, counts, train_tokens, weights, strict=True):
        entries.append(
            SourceEntry(
                name=source.name,
                split=source.split,
                weight=weight,
                files=[str(f) for f in source.files],
                splits=_split_counts(count),
                train_range=(begin, begin + tokens),
                natural_share=tokens / total,
                sampling_share=weight / sum(weights) if weighted else tokens / total,
            )
        )
        begin += tokens
    return entries


def summary(meta: DataMeta, seconds: float) -> str:
    return "\n".join(
        [f"prepared in {seconds:.1f}s: vocab {meta.vocab_size}, dtype {meta.dtype}", *overview_lines(meta)]
    )
