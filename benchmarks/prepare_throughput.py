"""Throughput and peak memory of `sllm prepare` against a naive single-process loop.

The corpus is real Korean and English text from ../shared/data (NSMC reviews, KorSTS
sentences, tiny Shakespeare), drawn at random into JSONL documents of a few kilobytes until
it reaches the asked size. Both contenders use the same BPE tokenizer, trained once here on a
sample. The naive loop reads the JSONL, calls `tokenizer.encode(doc)` per document, appends
a numpy array per document and writes one file; `sllm prepare` additionally cleans (NFC,
control characters), splits and shards. Each run is a fresh subprocess; they alternate in
rounds, and the table gives the median. Peak memory is the child's maximum resident set
(`getrusage(RUSAGE_CHILDREN)` in a wrapper process that starts only that child). With
`kiwipiepy` installed a last row prepares with a morpheme-aware tokenizer
(`tokenizer.pretokenize: kiwi`, trained on the same sample): the analyzer's cost.

    PYTHONPATH=src python benchmarks/prepare_throughput.py --throughput-mb 100 --memory-gb 0.5 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

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


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> None:
    """JSONL of documents mixing ~70% Korean (20 reviews/sentences) and ~30% English (8 speeches)."""
    korean, english = _texts()
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size_bytes:
            if rng.random() < 0.7:
                text = "\n".join(rng.choice(korean) for _ in range(20))
            else:
                text = "\n\n".join(rng.choice(english) for _ in range(8))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))


def train_tokenizer(corpus: Path, out: Path, pretokenize: str = "none") -> Path:
    sys.path.insert(0, str(REPO / "src"))
    from sllm.tokenizer import train_bpe

    with open(corpus, encoding="utf-8") as handle:
        sample = [json.loads(line)["text"] for line, _ in zip(handle, range(4000), strict=False)]
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


def throughput(work: Path, size_mb: float, rounds: int) -> list[tuple[str, float, float, float]]:
    corpus = work / "throughput.jsonl"
    write_corpus(corpus, int(size_mb * 1e6))
    tokenizer = train_tokenizer(corpus, work / "tok")
    megabytes = corpus.stat().st_size / 1e6

    def naive(number: int) -> list[str]:
        return [
            sys.executable,
            "-c",
            NAIVE_LOOP,
            str(tokenizer),
            str(corpus),
            str(work / f"naive-{number}.bin"),
        ]

    all_threads = f"sllm prepare, {os.cpu_count()} threads"
    contenders = {
        "naive loop (1 process)": naive,
        "sllm prepare, 1 thread": lambda n: prepare_command(corpus, tokenizer, work / f"one-{n}"),
        all_threads: lambda n: prepare_command(corpus, tokenizer, work / f"all-{n}"),
    }
    outputs = {"sllm prepare, 1 thread": "one", all_threads: "all"}
    if importlib.util.find_spec("kiwipiepy"):
        kiwi_tokenizer = train_tokenizer(corpus, work / "tok-kiwi", "kiwi")
        kiwi = f"sllm prepare, kiwi morphemes, {os.cpu_count()} threads"
        contenders[kiwi] = lambda n: prepare_command(corpus, kiwi_tokenizer, work / f"kiwi-{n}")
        outputs[kiwi] = "kiwi"
    threads = {"sllm prepare, 1 thread": 1}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for number in range(rounds):
        for name, command in contenders.items():
            seconds, _ = measure(command(number), _env(threads.get(name)))
            times[name].append(seconds)
    from sllm.data.meta import DataMeta

    tokens = {
        name: sum(s.tokens for s in DataMeta.read(work / f"{out}-0").splits.values())
        for name, out in outputs.items()
    }
    naive_tokens = tokens["naive loop (1 process)"] = (work / "naive-0.bin").stat().st_size // 2
    print(f"tokens: naive loop {naive_tokens:,}, sllm prepare {tokens[all_threads]:,} (prepare also cleans)")
    return [(name, megabytes, tokens[name], statistics.median(ts)) for name, ts in times.items()]


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
    parser.add_argument("--throughput-mb", type=float, default=100.0, help="throughput corpus MB; 0 skips")
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

    rows = throughput(work, args.throughput_mb, args.rounds) if args.throughput_mb > 0 else []
    naive_seconds = rows[0][3] if rows else 0.0
    if rows:
        print("\n| contender | MB/s | tokens/s | seconds | vs naive |\n|---|---|---|---|---|")
    for name, megabytes, tokens, seconds in rows:
        print(f"| {name} | {megabytes / seconds:.2f} | {tokens / seconds:,.0f} | {seconds:.1f} | "
              f"{naive_seconds / seconds:.2f}× |")  # fmt: skip

    if args.memory_gb:
        print("\n| corpus GB | seconds | MB/s | peak RSS MiB |\n|---|---|---|---|")
        for gigabytes, seconds, peak in memory(work, args.memory_gb):
            print(f"| {gigabytes:.2f} | {seconds:.0f} | {gigabytes * 1000 / seconds:.2f} | {peak:,.0f} |")
    print(f"\nload at end {os.getloadavg()[0]:.1f}; scratch files in {work}")


if __name__ == "__main__":
    main()
