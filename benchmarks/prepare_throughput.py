"""Throughput and peak memory of `sllm prepare` against a naive single-process loop.

Two corpora of real Korean and English text from ../shared/data, as JSONL: long documents
(NSMC reviews and KorSTS sentences 20 to a document ~70%, tiny Shakespeare 8 speeches to a
document ~30%, a few kilobytes each) and short ones (one review or sentence per line, ~110
bytes, as NSMC, chat logs or titles come). Each corpus gets its own 16k byte-level BPE,
trained by sllm on its first 4 MB, which both contenders use. The naive loop reads the JSONL,
calls `tokenizer.encode(doc)` of `tokenizers` per document, appends a numpy array per document
and writes one file; `sllm prepare` additionally cleans (NFC, control characters), splits and
shards. Each run is a fresh subprocess; they alternate in rounds, and the table gives the
median; "vs naive" compares MB/s with the naive loop's on the same corpus. Peak memory is the
child's maximum resident set (`getrusage(RUSAGE_CHILDREN)` in a wrapper process that starts
only that child). With `kiwipiepy` installed a last row per corpus prepares its first
`--kiwi-mb` with a morpheme-aware tokenizer (`tokenizer.pretokenize: kiwi`): the analyzer's cost.

    PYTHONPATH=src python benchmarks/prepare_throughput.py --throughput-mb 60 --short-mb 120 --memory-gb 0.5 2
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SAMPLE_BYTES = 4_000_000

NAIVE_LOOP = """
import json, sys
import numpy as np
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
eos = tokenizer.token_to_id("<|endoftext|>")
pieces = []
with open(sys.argv[2], encoding="utf-8") as handle:
    for line in handle:
        ids = tokenizer.encode(json.loads(line)["text"]).ids
        pieces.append(np.asarray(ids + [eos], dtype=np.uint16))
np.concatenate(pieces).tofile(sys.argv[3])
"""

MEASURE_CHILD = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
seconds = time.perf_counter() - started
print(done.returncode, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _texts() -> tuple[list[str], list[str]]:
    reviews: list[str] = []
    for path in sorted((SHARED / "nsmc" / "raw").glob("*.json")):
        reviews += [r["review"] for r in json.loads(path.read_text("utf-8")) if r.get("review")]
    for name in ("sts-train.tsv", "sts-dev.tsv"):
        for line in (SHARED / "korsts" / name).read_text("utf-8").splitlines()[1:]:
            reviews += line.split("\t")[5:7]
    english = (SHARED / "tinyshakespeare" / "input.txt").read_text("utf-8").split("\n\n")
    return reviews, english


def write_corpus(path: Path, size_bytes: int, seed: int = 0, short: bool = False) -> None:
    """JSONL of documents: long ones mixing ~70% Korean (20 reviews/sentences) and ~30% English
    (8 speeches), or short ones (`short`): one Korean review or sentence per line, as NSMC is."""
    korean, english = _texts()
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size_bytes:
            if short:
                text = rng.choice(korean)
            elif rng.random() < 0.7:
                text = "\n".join(rng.choice(korean) for _ in range(20))
            else:
                text = "\n\n".join(rng.choice(english) for _ in range(8))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))


def head(corpus: Path, out: Path, size_bytes: int) -> Path:
    """The first whole lines of `corpus` up to `size_bytes`."""
    written = 0
    with open(corpus, "rb") as source, open(out, "wb") as handle:
        for line in source:
            if written + len(line) > size_bytes:
                break
            handle.write(line)
            written += len(line)
    return out


def mean_document_bytes(corpus: Path, documents: int = 10_000) -> float:
    """The mean UTF-8 size of the first `documents` texts of `corpus`."""
    with open(corpus, encoding="utf-8") as handle:
        lines = itertools.islice(handle, documents)
        return statistics.mean(len(json.loads(line)["text"].encode("utf-8")) for line in lines)


def train_tokenizer(corpus: Path, out: Path, pretokenize: str = "none") -> Path:
    """A 16k byte-level BPE trained by sllm on the first TOKENIZER_SAMPLE_BYTES of `corpus`."""
    sys.path.insert(0, str(REPO / "src"))
    from sllm.tokenizer import train_bpe

    sample, taken = [], 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            sample.append(json.loads(line)["text"])
            taken += len(line)
            if taken >= TOKENIZER_SAMPLE_BYTES:
                break
    train_bpe(iter(sample), 16000, ["<|endoftext|>", "<|pad|>"], pretokenize=pretokenize).save(out)
    return out / "tokenizer.json"


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of `command` run alone in a wrapper process."""
    wrapper = [sys.executable, "-c", MEASURE_CHILD, *command]
    output = subprocess.run(wrapper, env=env, capture_output=True, text=True, check=True).stdout.split()
    code, seconds, peak_kib = int(output[0]), float(output[1]), int(output[2])
    if code != 0:
        raise SystemExit(f"{command} failed with exit code {code}")
    return seconds, peak_kib / 1024


def _env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    return env


def prepare_command(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sllm", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(out), "--val-ratio", "0.01"]  # fmt: skip


@dataclass
class Contender:
    """One row: the naive loop or `sllm prepare` over a corpus, with its encoding threads (None:
    all cores); each round writes its own output."""

    name: str
    corpus: Path
    tokenizer: Path
    out_stem: Path
    naive: bool = False
    threads: int | None = None
    seconds: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def out(self, number: int) -> Path:
        return self.out_stem.with_name(f"{self.out_stem.name}-{number}{'.bin' if self.naive else ''}")

    def command(self, number: int) -> list[str]:
        if self.naive:
            return [
                sys.executable,
                "-c",
                NAIVE_LOOP,
                str(self.tokenizer),
                str(self.corpus),
                str(self.out(number)),
            ]
        return prepare_command(self.corpus, self.tokenizer, self.out(number))

    def tokens(self) -> int:
        from sllm.data.meta import DataMeta

        if self.naive:
            return self.out(0).stat().st_size // 2
        return sum(s.tokens for s in DataMeta.read(self.out(0)).splits.values())


def contenders(work: Path, kind: str, size_mb: float, kiwi_mb: float) -> list[Contender]:
    """The naive loop and `sllm prepare` (1 thread, all) on one corpus; kiwi on its first `kiwi_mb`."""
    corpus = work / f"{kind}.jsonl"
    write_corpus(corpus, int(size_mb * 1e6), short=kind == "short")
    tokenizer = train_tokenizer(corpus, work / f"tok-{kind}")
    rows = [
        Contender("naive loop (1 process)", corpus, tokenizer, work / f"{kind}-naive", naive=True),
        Contender("sllm prepare, 1 thread", corpus, tokenizer, work / f"{kind}-one", threads=1),
        Contender(f"sllm prepare, {os.cpu_count()} threads", corpus, tokenizer, work / f"{kind}-all"),
    ]
    if importlib.util.find_spec("kiwipiepy") and kiwi_mb > 0:
        sliced = head(corpus, work / f"{kind}-kiwi.jsonl", int(kiwi_mb * 1e6))
        kiwi_tokenizer = train_tokenizer(corpus, work / f"tok-{kind}-kiwi", "kiwi")
        name = f"sllm prepare, kiwi morphemes, {os.cpu_count()} threads (first {kiwi_mb:g} MB)"
        rows.append(Contender(name, sliced, kiwi_tokenizer, work / f"{kind}-kiwi"))
    return rows


def throughput(
    work: Path, sizes: dict[str, float], kiwi_mb: float, rounds: int
) -> list[tuple[str, Contender]]:
    """Every contender of every corpus, alternating in rounds: (corpus kind, contender) with times."""
    rows = [
        (kind, c) for kind, size in sizes.items() if size > 0 for c in contenders(work, kind, size, kiwi_mb)
    ]
    for _ in range(rounds):
        for _, contender in rows:
            seconds, peak = measure(contender.command(len(contender.seconds)), _env(contender.threads))
            contender.seconds.append(seconds)
            contender.peaks.append(peak)
    return rows


def memory(work: Path, sizes_gb: list[float]) -> list[tuple[float, float, float]]:
    rows = []
    tokenizer = None
    for size in sizes_gb:
        corpus = work / f"memory-{size}.jsonl"
        write_corpus(corpus, int(size * 1e9), seed=1)
        tokenizer = tokenizer or train_tokenizer(corpus, work / "tok-memory")
        seconds, peak = measure(prepare_command(corpus, tokenizer, work / f"memory-{size}"), _env(None))
        rows.append((corpus.stat().st_size / 1e9, seconds, peak))
        corpus.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-mb", type=float, default=100.0, help="long-document corpus MB; 0 skips")
    parser.add_argument("--short-mb", type=float, default=120.0, help="short-document corpus MB; 0 skips")
    parser.add_argument(
        "--kiwi-mb", type=float, default=5.0, help="MB of each corpus for the kiwi row; 0 skips"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the throughput runs")
    parser.add_argument(
        "--memory-gb", type=float, nargs="*", default=[0.5, 2.0], help="corpus sizes for memory"
    )
    parser.add_argument("--work", help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sllm-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f} at start"
    )

    sizes = {"long": args.throughput_mb, "short": args.short_mb}
    rows = throughput(work, sizes, args.kiwi_mb, args.rounds)
    if rows:
        print("\n| documents | contender | MB | MB/s | tokens/s | seconds | peak RSS MiB | vs naive |")
        print("|---|---|---|---|---|---|---|---|")
    naive_rate: dict[str, float] = {}
    for kind, row in rows:
        seconds = statistics.median(row.seconds)
        megabytes = row.corpus.stat().st_size / 1e6
        rate = megabytes / seconds
        naive_rate.setdefault(kind, rate)  # the naive loop comes first
        average = mean_document_bytes(row.corpus)
        print(f"| {kind} (~{average:,.0f} B each) | {row.name} | {megabytes:.1f} | {rate:.2f} | "
              f"{row.tokens() / seconds:,.0f} | {seconds:.1f} | {max(row.peaks):,.0f} | "
              f"{rate / naive_rate[kind]:.2f}× |")  # fmt: skip

    if args.memory_gb:
        print("\n| corpus GB | seconds | MB/s | peak RSS MiB |\n|---|---|---|---|")
        for gigabytes, seconds, peak in memory(work, args.memory_gb):
            print(f"| {gigabytes:.2f} | {seconds:.0f} | {gigabytes * 1000 / seconds:.2f} | {peak:,.0f} |")
    print(f"\nload at end {os.getloadavg()[0]:.1f}; scratch files in {work}")


if __name__ == "__main__":
    main()
