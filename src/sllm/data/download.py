"""`sllm download PRESET --out DIR`: well-known corpora streamed from the Hugging Face hub into
JSONL shards that `sllm prepare --input DIR` reads.

Shards appear whole, then the manifest `download.json` lists them; a budget (`max_docs`,
`max_bytes`) ends it cleanly. An interrupted download resumes: unlisted shards are deleted and
the hub's fixed-order stream is read again, skipping documents already written. Hub and network
failures become one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from sllm.atomic import atomic_text_writer, ensure_writable_dir, recover_all, write_text_atomic
from sllm.data.sources import DOWNLOAD_MANIFEST, require_module
from sllm.errors import UserError
from sllm.files import loads_json
from sllm.progress import progress_bar

DEFAULT_SHARD_DOCS = 50_000
NSMC_TRAIN_URL = "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_train.txt"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Preset:
    """One downloadable corpus: where it lives and which fields make a document."""

    name: str
    hf_id: str  # hub dataset id, or a `datasets` builder ("csv") when `data_files` is set
    config: str | None
    split: str
    fields: tuple[str, ...]  # joined with "\n"; empty or missing values are left out
    license: str
    description: str
    data_files: str | None = None  # a URL the builder reads instead of a hub repository
    loader_options: tuple[tuple[str, Any], ...] = ()  # extra keyword arguments of load_dataset
    split_paragraphs: bool = False  # one document per blank-line-separated paragraph

    @property
    def source(self) -> str:
        """Where the text comes from, as `--list` and the manifest show it."""
        if self.data_files:
            return self.data_files
        return self.hf_id + (f" ({self.config})" if self.config else "")

    @property
    def host(self) -> str:
        return urlparse(self.data_files).netloc if self.data_files else "the Hugging Face hub"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "ko-wikipedia", "wikimedia/wikipedia", "20231101.ko", "train", ("title", "text"),
            "CC BY-SA 3.0 / GFDL", "Korean Wikipedia, dump of 2023-11-01; title and article text",
        ),
        Preset(
            "klue-ynat", "klue/klue", "ynat", "train", ("title",),
            "CC BY-SA 4.0", "KLUE topic classification: Yonhap news headlines, one per document",
        ),
        Preset(
            "klue-sts", "klue/klue", "sts", "train", ("sentence1", "sentence2"),
            "CC BY-SA 4.0", "KLUE-STS sentence pairs, one pair per document",
        ),
        Preset(
            "klue-nli", "klue/klue", "nli", "train", ("premise", "hypothesis"),
            "CC BY-SA 4.0", "KLUE-NLI premise + hypothesis; premises repeat, so data.dedup helps",
        ),
        Preset(
            "kr3", "leey4n/KR3", None, "train", ("Review",),
            "CC BY-NC-SA 4.0", "KR3 Korean restaurant reviews (non-commercial use only)",
        ),
        Preset(
            "nsmc", "csv", None, "train", ("document",),
            "CC0 1.0", "Naver movie reviews, the GitHub train file (the hub's e9t/nsmc is a "
            "loading script, which datasets >= 4 refuses)",
            data_files=NSMC_TRAIN_URL,
            loader_options=(("delimiter", "\t"), ("quoting", 3), ("keep_default_na", False)),
        ),
        Preset(
            "openwebtext", "Skylion007/openwebtext", None, "train", ("text",),
            "CC0 1.0", "open reproduction of GPT-2's WebText, about 8M English web pages",
        ),
        Preset(
            "wikitext-103", "Salesforce/wikitext", "wikitext-103-raw-v1", "train", ("text",),
            "CC BY-SA 3.0 / GFDL", "English Wikipedia good articles, one line (paragraph or heading) each",
        ),
        Preset(
            "fineweb-edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", ("text",),
            "ODC-BY 1.0", "10B-token sample of FineWeb-Edu, educational English web pages",
        ),
        Preset(
            "tinystories", "roneneldan/TinyStories", None, "train", ("text",),
            "CDLA-Sharing 1.0", "short synthetic stories in simple English",
        ),
        Preset(
            "tiny-shakespeare", "karpathy/tiny_shakespeare", None, "train", ("text",),
            "public domain (none on the card)",
            "Shakespeare, about 1 MB; one document per blank-line-separated speech",
            split_paragraphs=True,
        ),
    )
}  # fmt: skip

Loader = Callable[[Preset], Iterable[Mapping[str, Any]]]


@dataclass
class Manifest:
    """`download.json`: what was asked, what is on disk, and whether the run finished."""

    preset: str
    hf_id: str
    config: str | None
    split: str
    data_files: str | None
    license: str
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the document texts
    shards: list[dict[str, Any]] = field(default_factory=list)  # {file, documents, bytes}
    max_docs: int | None = None
    max_bytes: int | None = None
    finished: bool = False
    stopped_by: str | None = None  # "end" of the split, "max_docs" or "max_bytes"


@dataclass
class DownloadResult:
    manifest: Manifest
    out_dir: Path
    already_done: bool


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (see `sllm download --list`)"
        )
    return PRESETS[name]


def format_presets() -> str:
    """The `--list` table: name, source, license, description."""
    rows = [("preset", "Hugging Face dataset (config)", "license", "description")]
    rows += [(p.name, p.source, p.license, p.description) for p in PRESETS.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )


def describe(result: DownloadResult) -> str:
    m = result.manifest
    reached = {"end": "the whole split", "max_docs": "--max-docs reached", "max_bytes": "--max-bytes reached"}
    state = "already complete" if result.already_done else reached[m.stopped_by or "end"]
    return (
        f"{m.preset}: {m.documents:,} documents, {m.bytes:,} bytes of text in {len(m.shards)} "
        f"shard{'' if len(m.shards) == 1 else 's'} "
        f"in {result.out_dir} ({state}); next: sllm prepare --input {result.out_dir}"
    )


def stream_from_hub(preset: Preset) -> Iterable[Mapping[str, Any]]:
    """The preset's split as a streaming `datasets` dataset (records fetched as iterated)."""
    datasets = require_module("datasets", f"sllm download {preset.name}")
    if urlparse(preset.data_files or "").scheme in ("http", "https"):
        require_module("aiohttp", f"streaming {preset.data_files}")  # fsspec's HTTP file system needs it
    # Offline, the hub client retries for ~25 s with a warning each time; the user gets the one
    # line at the end instead. Set after the import, which resets the hub logger's level.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return datasets.load_dataset(
            preset.hf_id,
            preset.config,
            split=preset.split,
            data_files=preset.data_files,
            streaming=True,
            **dict(preset.loader_options),
        )
    finally:
        hub_logger.setLevel(level)


def download(
    name: str,
    out_dir: str | Path,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    shard_docs: int = DEFAULT_SHARD_DOCS,
    load: Loader = stream_from_hub,
    progress: bool = True,
) -> DownloadResult:
    """Stream preset `name` into JSONL shards under `out_dir`, resuming an earlier run there."""
    preset = get_preset(name)
    _check_positive(max_docs=max_docs, max_bytes=max_bytes, shard_docs=shard_docs)
    out = Path(out_dir)
    created = not out.exists()
    ensure_writable_dir(out, "download")
    recover_all(out)
    manifest = _read_manifest(out, preset)
    _delete_unlisted_shards(out, manifest)
    if _already_done(manifest, max_docs, max_bytes):
        return DownloadResult(manifest, out, already_done=True)
    manifest = dataclasses.replace(
        manifest, max_docs=max_docs, max_bytes=max_bytes, finished=False, stopped_by=None
    )
    records = _guarded(preset, load)
    budget = _Budget(max_docs, max_bytes, manifest.documents, manifest.bytes)
    documents = budget.take(islice(documents_of(preset, records), manifest.documents, None))
    try:
        with progress_bar(total=max_docs, initial=manifest.documents, unit=" docs", show=progress) as bar:
            _write_shards(out, manifest, documents, shard_docs, bar)
    except BaseException:
        if created and not manifest.shards:  # the manifest is written with the first shard
            with suppress(OSError):
                out.rmdir()
        raise
    manifest.finished, manifest.stopped_by = True, budget.stopped_by or "end"
    _save(out, manifest)
    return DownloadResult(manifest, out, already_done=False)


def documents_of(preset: Preset, records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The non-blank documents of `records`: the preset's fields joined, paragraphs split."""
    for record in records:
        missing = [name for name in preset.fields if name not in record]
        if missing:
            raise UserError(
                f"{preset.source} has no field {missing[0]!r} (fields: {', '.join(record)}); "
                "the dataset changed on the hub: use `sllm prepare --input hf:NAME --text-field FIELD`"
            )
        text = "\n".join(str(record[name]) for name in preset.fields if record[name] not in (None, ""))
        pieces = _PARAGRAPH_BREAK.split(text) if preset.split_paragraphs else [text]
        yield from (piece.strip("\n") for piece in pieces if piece.strip())


@dataclass
class _Budget:
    """Passes documents on while they fit `max_docs` and `max_bytes`; notes which one stopped."""

    max_docs: int | None
    max_bytes: int | None
    documents: int
    bytes: int
    stopped_by: str | None = None

    def take(self, documents: Iterator[str]) -> Iterator[tuple[str, int]]:
        while self.max_docs is None or self.documents < self.max_docs:  # checked before reading on
            text = next(documents, None)
            if text is None:
                return
            size = len(text.encode("utf-8"))
            if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                self.stopped_by = "max_bytes"
                return
            self.documents, self.bytes = self.documents + 1, self.bytes + size
            yield text, size
        self.stopped_by = "max_docs"


def _write_shards(
    out: Path, manifest: Manifest, documents: Iterator[tuple[str, int]], shard_docs: int, bar: tqdm
) -> None:
    """Each shard appears whole (temp name, then rename) before the manifest lists it."""
    for first in documents:
        path = out / f"{manifest.preset}-{len(manifest.shards):05d}.jsonl"
        count = size = 0
        with atomic_text_writer(path) as handle:
            for text, text_bytes in chain([first], islice(documents, shard_docs - 1)):
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count, size = count + 1, size + text_bytes
                bar.update()
                bar.set_postfix_str(f"{(manifest.bytes + size) / 1e6:,.1f} MB", refresh=False)
        manifest.shards.append({"file": path.name, "documents": count, "bytes": size})
        manifest.documents, manifest.bytes = manifest.documents + count, manifest.bytes + size
        _save(out, manifest)


def _guarded(preset: Preset, load: Loader) -> Iterator[Mapping[str, Any]]:
    """The loader's records, with its failures (at load time or mid-stream) as one line."""
    try:
        yield from load(preset)
    except UserError:
        raise
    except Exception as exc:  # hub, network and format errors; a connection lost mid-stream
        raise _load_error(preset, exc) from None


def _load_error(preset: Preset, exc: BaseException) -> UserError:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if _is_network_error(exc) or not _reachable(preset):
        return UserError(
            f"cannot reach {preset.host} (offline?) to download {preset.name} ({reason[:200]}); check the "
            "network or set HF_ENDPOINT to a mirror, or fetch the files yourself and use "
            "`sllm prepare --input FILE`"
        )
    return UserError(
        f"cannot load {preset.name} from {preset.source} ({reason[:200]}); the dataset may have changed on "
        "the hub: try `sllm prepare --input hf:NAME` with your own settings, or a local file"
    )


def _is_network_error(exc: BaseException) -> bool:
    """True for connection and timeout failures, however the HTTP library wraps them."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, ConnectionError | TimeoutError) or "Connect" in name or "Timeout" in name:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reachable(preset: Preset) -> bool:
    """Whether the preset's host answers: `datasets` reports an unreachable URL as a missing file."""
    if any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES):
        return False
    url = urlparse(preset.data_files or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except (OSError, ValueError):
        return False
    return True


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be a positive number, not {value}")


def _read_manifest(out: Path, preset: Preset) -> Manifest:
    path = out / DOWNLOAD_MANIFEST
    if not path.exists():
        return Manifest(
            preset.name, preset.hf_id, preset.config, preset.split, preset.data_files, preset.license
        )
    try:
        manifest = Manifest(**loads_json(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        raise UserError(f"{path} is damaged; delete {out} to download again") from None
    if manifest.preset != preset.name:
        raise UserError(
            f"{out} holds a download of {manifest.preset}; choose another --out for {preset.name}"
        )
    return manifest


def _delete_unlisted_shards(out: Path, manifest: Manifest) -> None:
    """A shard renamed into place just before a crash, not yet in the manifest: written again."""
    listed = {shard["file"] for shard in manifest.shards}
    for path in out.glob(f"{manifest.preset}-*.jsonl"):
        if path.name not in listed:
            path.unlink()


def _already_done(manifest: Manifest, max_docs: int | None, max_bytes: int | None) -> bool:
    if manifest.stopped_by == "end" or (max_docs is not None and manifest.documents >= max_docs):
        return True
    if max_bytes is None:
        return False
    hit_before = manifest.stopped_by == "max_bytes" and max_bytes <= (manifest.max_bytes or 0)
    return manifest.bytes >= max_bytes or hit_before


def _save(out: Path, manifest: Manifest) -> None:
    write_text_atomic(out / DOWNLOAD_MANIFEST, json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
