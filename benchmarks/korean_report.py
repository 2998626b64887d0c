"""The Korean quality report (docs/korean.md): tokenizers, positions and block style side by side.

Builds one Korean + English corpus from ../shared/data (NSMC reviews, tiny Shakespeare), then
for each variant runs the real commands: `sllm tokenizer train`, `sllm prepare`, `sllm train`
(the demo model's shape), `sllm finetune sts` on KorSTS, and scores held-out text with
`sllm.evaluate` (bits per byte per script) and `sllm.finetune.sts.evaluate_sts` (KorSTS test).

Budget: every pre-training run sees the same number of bytes of training text (bytes-fair) at
the same tokens per step (micro-batch × context); steps = bytes / (tokens per step × the data's
bytes per token), so a tokenizer that packs more text per token trains fewer steps. Held-out
text: every 20th NSMC file (Korean) and the last 10% of Shakespeare (English); KorSTS
sentences are kept out of the pre-training text. Tokenizers, prepared data and finished rows
are cached in --work, so a second run resumes where the first stopped.

    PYTHONPATH=src python benchmarks/korean_report.py --tokens-fair  # docs/korean.md: ~70 min, 2 cores
    PYTHONPATH=src python benchmarks/korean_report.py --smoke        # minutes: a tiny budget, 8k only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HELD_OUT_EVERY_NTH_FILE = 20  # NSMC files held out for Korean evaluation
ENGLISH_HELD_OUT_SHARE = 0.1  # the end of tiny Shakespeare
TOKENS_PER_STEP = (16, 128)  # micro-batch, context: the demo preset's
LLAMA_BLOCK = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"]
ARCH_VARIANTS = {
    "gpt2-learned": [],
    "gpt2-rope": ["model.pos=rope"],
    "llama-rope": LLAMA_BLOCK,  # mlp_hidden is sized so the parameter count matches gpt2-learned
}


@dataclasses.dataclass(frozen=True)
class Variant:
    pretokenize: str  # "none" (byte-level BPE) or "kiwi" (morpheme-aware BPE)
    vocab_size: int
    arch: str = "gpt2-learned"
    budget: str = "bytes"  # or "tokens": the steps of the byte-level BPE of the same size

    @property
    def tokenizer_name(self) -> str:
        return f"{'kiwi' if self.pretokenize == 'kiwi' else 'byte'}-{self.vocab_size // 1000}k"

    @property
    def name(self) -> str:
        return f"{self.tokenizer_name}-{self.arch}" + ("-tokens-fair" if self.budget == "tokens" else "")


# ---- the corpus ----------------------------------------------------------------------------


def korsts_sentences(shared: Path) -> set[str]:
    sentences = set()
    for split in ("train", "dev", "test"):
        rows = (shared / "korsts" / f"sts-{split}.tsv").read_text("utf-8").splitlines()[1:]
        for row in rows:
            fields = row.split("\t")
            sentences.update(field.strip() for field in fields[5:7])
    return sentences


def build_corpus(shared: Path, out: Path, korean_bytes: int) -> dict[str, Path]:
    """train.jsonl (the first `korean_bytes` of Korean reviews + English paragraphs), heldout-ko.jsonl,
    heldout-en.jsonl."""
    paths = {name: out / f"{name}.jsonl" for name in ("train", "heldout-ko", "heldout-en")}
    if all(path.is_file() for path in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    excluded = korsts_sentences(shared)
    train, held_ko = [], []
    for index, file in enumerate(sorted((shared / "nsmc" / "raw").glob("*.json"))):
        reviews = [r["review"].strip() for r in json.loads(file.read_text("utf-8"))]
        reviews = [r for r in reviews if r and r not in excluded]
        (held_ko if index % HELD_OUT_EVERY_NTH_FILE == 0 else train).extend(reviews)
    sizes = itertools.accumulate(len(review.encode()) for review in train)
    train = train[: sum(1 for size in sizes if size <= korean_bytes)]
    lines = (shared / "tinyshakespeare" / "input.txt").read_text("utf-8").splitlines()
    cut = int(len(lines) * (1 - ENGLISH_HELD_OUT_SHARE))
    english_train, held_en = paragraphs(lines[:cut]), paragraphs(lines[cut:])
    # Interleave so the demo's validation split and any prefix sample hold both languages.
    step = max(1, len(train) // max(1, len(english_train)))
    mixed = []
    for i, paragraph in enumerate(english_train):
        mixed.extend(train[i * step : (i + 1) * step])
        mixed.append(paragraph)
    mixed.extend(train[len(english_train) * step :])
    for name, texts in (("train", mixed), ("heldout-ko", held_ko), ("heldout-en", held_en)):
        leaked = excluded.intersection(texts)
        assert not leaked, f"KorSTS sentences in {name}: {sorted(leaked)[:3]}"
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    return paths


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line-separated paragraphs (one speech of Shakespeare each)."""
    text = "\n".join(lines)
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()]


# ---- the real commands --------------------------------------------------------------------


def sllm(argv: list[str], log_file: Path) -> float:
    """Runs `sllm ARGV` in a fresh process with its output in `log_file`; the seconds it took.
    A process per command: kiwipiepy's worker threads, once started, slow torch in the same process."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_file, "a", encoding="utf-8") as log:
        print("$ sllm " + " ".join(argv), file=log, flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "sllm", *argv, "--quiet"],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode:
        raise SystemExit(f"`sllm {' '.join(argv)}` failed (exit {done.returncode}); see {log_file}")
    return time.perf_counter() - started


def isolated(function, *args):
    """`function(*args)` in a fresh process, for the same reason as `sllm`."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def tokenizer_dir(work: Path, variant: Variant, corpus: dict[str, Path]) -> Path:
    out = work / "tokenizers" / variant.tokenizer_name
    if not (out / "tokenizer.json").is_file():
        seconds = sllm(
            ["tokenizer", "train", "--out", str(out), "--input", str(corpus["train"]),
             f"tokenizer.vocab_size={variant.vocab_size}", f"tokenizer.pretokenize={variant.pretokenize}"],
            work / "logs" / f"tokenizer-{variant.tokenizer_name}.log",
        )  # fmt: skip
        (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return out


def data_dir(work: Path, variant: Variant, corpus: dict[str, Path], tokenizer: Path) -> Path:
    out = work / "data" / variant.tokenizer_name
    if not (out / "meta.json").is_file():
        sllm(
            ["prepare", "--input", str(corpus["train"]), "--tokenizer", str(tokenizer), "--out", str(out),
             "data.val_ratio=0.01",
             f"data.test_inputs=[{corpus['heldout-ko']}, {corpus['heldout-en']}]"],
            work / "logs" / f"prepare-{variant.tokenizer_name}.log",
        )  # fmt: skip
    return out


def tokenizer_stats(tokenizer_path: Path, corpus: dict[str, Path]) -> dict[str, float]:
    """Characters and words per token on held-out Korean and English; the share of the vocabulary
    (special tokens included) that encoding both held-out texts uses."""
    from sllm.tokenizer import load_tokenizer
    from sllm.tokenizer_stats import measure

    tokenizer = load_tokenizer(tokenizer_path)
    stats = measure(tokenizer, read_texts(corpus["heldout-ko"]) + read_texts(corpus["heldout-en"]))
    ko, en = stats.groups["ko"], stats.groups["en"]
    return {
        "ko_chars_per_token": ko.chars / ko.tokens,
        "ko_words_per_token": ko.words / ko.tokens,
        "ko_bytes_per_token": ko.bytes / ko.tokens,
        "en_chars_per_token": en.chars / en.tokens,
        "en_words_per_token": en.words / en.tokens,
        "ko_fallback": ko.fallback_tokens / ko.tokens,
        "vocab_used": stats.vocab_used / stats.vocab_size,
        "vocab_size": stats.vocab_size,
    }


def model_overrides(arch: str, data: Path) -> list[str]:
    """The architecture's overrides; the Llama-style block gets the SwiGLU width whose parameter
    count (token embedding included) comes closest to the GPT-2 block with learned positions."""
    overrides = list(ARCH_VARIANTS[arch])
    if arch == "llama-rope":
        reference = parameter_count(data, [])
        widths = range(64, 1024 + 1, 8)
        best = min(
            widths,
            key=lambda w: abs(parameter_count(data, [*overrides, f"model.mlp_hidden={w}"]) - reference),
        )
        overrides.append(f"model.mlp_hidden={best}")
    return overrides


def parameter_count(data: Path, overrides: list[str]) -> int:
    from sllm.config import load_config
    from sllm.data.meta import DataMeta
    from sllm.model import build_model, count_parameters

    vocab = DataMeta.read(data).vocab_size
    cfg = load_config("demo", [*overrides, f"model.vocab_size={vocab}"])
    return count_parameters(build_model(cfg.model))


def pretrain(
    work: Path, variant: Variant, data: Path, budget_data: Path, seed: int, train_bytes: int
) -> dict:
    """Trains on `data` for as many steps as `train_bytes` of text take in `budget_data`'s tokens."""
    from sllm.data.meta import DataMeta

    def bytes_per_token(prepared: Path) -> float:
        train_split = DataMeta.read(prepared).splits["train"]
        return train_split.bytes / train_split.tokens

    micro_batch, context = TOKENS_PER_STEP
    steps = max(1, round(train_bytes / (micro_batch * context * bytes_per_token(budget_data))))
    out = work / "runs" / f"{variant.name}-s{seed}"
    overrides = model_overrides(variant.arch, data)
    seconds = sllm(
        ["train", "--config", "demo", "--data", str(data), "--out", str(out), *overrides,
         "model.dropout=0.0", f"model.block_size={context}", f"train.micro_batch={micro_batch}",
         f"train.max_steps={steps}", f"train.warmup_steps={min(50, steps // 10)}", f"train.seed={seed}",
         "train.eval_interval=0", f"train.checkpoint_interval={steps}", "train.keep_last=1",
         "log.tensorboard=false", "log.samples_at_eval=false", "log.progress=false"],
        work / "logs" / f"train-{variant.name}-s{seed}.log",
    )  # fmt: skip
    return {
        "run": str(out),
        "steps": steps,
        "train_tokens": steps * micro_batch * context,
        "train_bytes_seen": round(steps * micro_batch * context * bytes_per_token(data)),
        "parameters": parameter_count(data, overrides),
        "overrides": overrides,
        "train_s": seconds,
    }


def held_out_bits_per_byte(run: str, data: Path) -> dict[str, float]:
    """Bits per byte of the prepared test split (held-out Korean and English documents) by script."""
    from sllm.evaluate import evaluate_run

    with contextlib.redirect_stderr(open(os.devnull, "w")):
        (result,) = evaluate_run(run, ["test"], device="cpu", data_dir=data)
    by_script = result.scores.script_bits_per_byte(result.script_bytes)
    return {"ko_bpb": by_script["ko"], "en_bpb": by_script["en"]}


def korsts(work: Path, run: str, name: str, shared: Path, epochs: int, train_pairs: int) -> dict[str, float]:
    """Fine-tune on KorSTS train (the best dev epoch kept, as `sllm finetune sts` does), score test."""
    from sllm.finetune.sts import evaluate_sts

    sts = shared / "korsts"
    train = sts / "sts-train.tsv"
    if train_pairs:
        train = work / "corpus" / f"sts-train-{train_pairs}.tsv"
        lines = (sts / "sts-train.tsv").read_text("utf-8").splitlines()
        train.write_text("\n".join(lines[: train_pairs + 1]) + "\n", "utf-8")
    out = work / "sts" / name
    seconds = sllm(
        ["finetune", "sts", "--run", run, "--train", str(train), "--dev", str(sts / "sts-dev.tsv"),
         "--out", str(out), f"sts.epochs={epochs}", "sts.device=cpu"],
        work / "logs" / f"sts-{name}.log",
    )  # fmt: skip
    scores, _ = isolated(evaluate_sts, out, sts / "sts-test.tsv", "cpu")
    return {"sts_spearman": scores.spearman, "sts_pearson": scores.pearson, "sts_s": seconds}


def run_row(
    work: Path, variant: Variant, seed: int, corpus: dict[str, Path], args: argparse.Namespace
) -> dict:
    """One variant and seed, end to end; cached as JSON in --work."""
    cached = work / "results" / f"{variant.name}-s{seed}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    tokenizer = tokenizer_dir(work, variant, corpus)
    data = data_dir(work, variant, corpus, tokenizer)
    row = {"variant": variant.name, **dataclasses.asdict(variant), "seed": seed}
    row |= isolated(tokenizer_stats, tokenizer, corpus)
    budget_data = data
    if variant.budget == "tokens":
        byte_level = Variant("none", variant.vocab_size)
        budget_data = data_dir(work, byte_level, corpus, tokenizer_dir(work, byte_level, corpus))
    row |= pretrain(work, variant, data, budget_data, seed, args.train_bytes)
    row |= isolated(held_out_bits_per_byte, row["run"], data)
    if args.sts_epochs:
        row |= korsts(
            work, row["run"], f"{variant.name}-s{seed}", args.shared, args.sts_epochs, args.sts_pairs
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=1))
    say(
        f"{variant.name} seed {seed}: ko bpb {row['ko_bpb']:.4f}, en bpb {row['en_bpb']:.4f}, "
        f"KorSTS {row.get('sts_spearman', float('nan')):.2f}, {row['steps']} steps, {row['train_s']:.0f} s"
    )
    return row


# ---- the tables ---------------------------------------------------------------------------


def mean_spread(values: list[float], digits: int) -> str:
    """The mean, and ± half the range over seeds when there are several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    return groups


def variant_table(header: str, alignment: str, rows: list[dict], cells: Callable[[dict], str]) -> str:
    """One line per variant: `cells` of its first row (what the seeds share), then its scores."""
    lines = [header, alignment]
    lines += [f"| {cells(group[0])} | {score_cells(group)} |" for group in grouped(rows).values()]
    return "\n".join(lines)


def tokenizer_table(rows: list[dict]) -> str:
    def cells(first: dict) -> str:
        kind = "morpheme-aware BPE (kiwi)" if first["pretokenize"] == "kiwi" else "byte-level BPE"
        kind += ", tokens-fair" if first.get("budget") == "tokens" else ""
        return (
            f"{kind} | {first['vocab_size']:,} | {first['ko_chars_per_token']:.3f} "
            f"| {first['ko_words_per_token']:.3f} | {first['en_chars_per_token']:.3f} "
            f"| {first['vocab_used']:.1%} | {first['parameters']:,} | {first['steps']:,} "
            f"| {first['train_bytes_seen'] / 1e6:.2f}"
        )

    header = (
        "| tokenizer | vocab | ko chars/token | ko words/token | en chars/token | vocab use | parameters "
        "| steps | text seen (MB) | **ko bpb** | **en bpb** | **KorSTS test Spearman** | seeds | train s |"
    )
    return variant_table(
        header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", rows, cells
    )


def score_cells(group: list[dict]) -> str:
    """Korean and English bits per byte, KorSTS test Spearman, seeds, mean training seconds."""
    spearman = [r["sts_spearman"] for r in group if "sts_spearman" in r]
    return " | ".join([
        mean_spread([r["ko_bpb"] for r in group], 4),
        mean_spread([r["en_bpb"] for r in group], 4),
        mean_spread(spearman, 2) if spearman else "–",
        str(len(group)),
        f"{statistics.mean(r['train_s'] for r in group):.0f}",
    ])  # fmt: skip


def arch_table(rows: list[dict]) -> str:
    def cells(first: dict) -> str:
        block, positions = first["arch"].split("-")
        overrides = " ".join(f"`{o}`" for o in first["overrides"]) or "(demo)"
        return (
            f"{'Llama-style' if block == 'llama' else 'GPT-2'} | {positions} | {overrides} "
            f"| {first['parameters']:,} | {first['steps']:,}"
        )

    header = (
        "| block | positions | overrides | parameters | steps | **ko bpb** | **en bpb** "
        "| **KorSTS test Spearman** | seeds | train s |"
    )
    return variant_table(header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|", rows, cells)


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        info = dict(
            line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
        )
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu = f"{info.get('model name', cpu)} (family {info.get('cpu family', '?')})"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or '?'}, {cpu}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s) per command), Python {platform.python_version()}"
    )


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- the report ---------------------------------------------------------------------------


def leaders(rows: list[dict], count: int) -> list[Variant]:
    """The `count` tokenizer variants with the lowest mean held-out Korean bits per byte."""
    groups = grouped(rows)
    ranked = sorted(groups.values(), key=lambda g: statistics.mean(r["ko_bpb"] for r in g))
    return [Variant(g[0]["pretokenize"], g[0]["vocab_size"]) for g in ranked[:count]]


def seeded_again(rows: list[dict], count: int) -> list[Variant]:
    """The `count` leaders, and the best of each tokenizer kind: the rows that get extra seeds."""
    chosen = leaders(rows, count)
    for kind in sorted({r["pretokenize"] for r in rows}):
        best = leaders([r for r in rows if r["pretokenize"] == kind], 1)
        chosen += [v for v in best if v not in chosen]
    return chosen


def require_same_budget(work: Path, args: argparse.Namespace) -> None:
    """The cached corpus and rows hold for one budget: a --work made with another is refused."""
    budget = {key: getattr(args, key) for key in ("korean_mb", "train_mb", "sts_epochs", "sts_pairs")}
    recorded = work / "budget.json"
    if not recorded.is_file():
        recorded.write_text(json.dumps(budget))
    elif json.loads(recorded.read_text()) != budget:
        raise SystemExit(f"{work} holds rows of another budget ({recorded.read_text()}); give another --work")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--work", type=Path, help="scratch and cache (default: a folder in the temp dir)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 16000, 32000])
    parser.add_argument("--pretokenize", nargs="+", default=["none", "kiwi"], choices=["none", "kiwi"])
    parser.add_argument("--korean-mb", type=float, default=5.0, help="MB of NSMC reviews in the corpus")
    parser.add_argument("--train-mb", type=float, default=3.0, help="MB of training text each run sees")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="seeds of every row")
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[2024], help="for the leading rows")
    parser.add_argument("--leaders", type=int, default=2, help="tokenizer rows that get --extra-seeds")
    parser.add_argument("--arch", nargs="*", default=list(ARCH_VARIANTS), choices=list(ARCH_VARIANTS))
    parser.add_argument("--sts-epochs", type=int, default=1, help="KorSTS fine-tune epochs; 0 skips it")
    parser.add_argument("--sts-pairs", type=int, default=0, help="KorSTS train pairs used; 0: all")
    parser.add_argument(
        "--tokens-fair", action="store_true", help="also train the kiwi leaders for the byte-level steps"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each command")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 8k only, 0.2 MB, 300 STS pairs")
    args = parser.parse_args()
    if not (args.shared / "nsmc" / "raw").is_dir() or not (args.shared / "korsts").is_dir():
        print(f"skipped: the shared data ({args.shared}: nsmc/raw, korsts, tinyshakespeare) is absent")
        return
    if args.smoke:
        args.sizes, args.train_mb, args.sts_pairs, args.extra_seeds = [8000], 0.2, 300, []
    args.train_bytes = round(args.train_mb * 1e6)
    # One torch thread per process: on a shared 2-core machine two threads stall on each other
    # whenever another job holds a core (docs/benchmarks.md); set before any torch import.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work or Path(tempfile.gettempdir()) / (
        "sllm-korean-report" + ("-smoke" if args.smoke else "")
    )
    work.mkdir(parents=True, exist_ok=True)
    require_same_budget(work, args)
    say(f"work dir {work}; logs of every command in {work / 'logs'}")
    started = time.perf_counter()
    corpus = build_corpus(args.shared, work / "corpus", round(args.korean_mb * 1e6))
    say("corpus: " + ", ".join(f"{n} {p.stat().st_size / 1e6:.2f} MB" for n, p in corpus.items()))

    tokenizer_rows = []
    for pretokenize in args.pretokenize:
        for size in args.sizes:
            for seed in args.seeds:
                tokenizer_rows.append(run_row(work, Variant(pretokenize, size), seed, corpus, args))
    for variant in seeded_again(tokenizer_rows, args.leaders) if args.extra_seeds else []:
        for seed in args.extra_seeds:
            tokenizer_rows.append(run_row(work, variant, seed, corpus, args))
    (winner,) = leaders(tokenizer_rows, 1)
    arch_rows = [r for r in tokenizer_rows if r["variant"] == winner.name]
    arch_seeds = sorted({r["seed"] for r in arch_rows})
    for arch in args.arch:
        if arch != "gpt2-learned":
            for seed in arch_seeds:
                arch_rows.append(run_row(work, dataclasses.replace(winner, arch=arch), seed, corpus, args))

    tokens = TOKENS_PER_STEP[0] * TOKENS_PER_STEP[1]
    print(f"\n{machine()}")
    print(
        f"budget per pre-training run: {args.train_mb} MB of training text, {tokens:,} tokens per step "
        f"({TOKENS_PER_STEP[0]} × {TOKENS_PER_STEP[1]}); KorSTS: {args.sts_epochs} epoch(s) of "
        f"{args.sts_pairs or 'all'} train pairs; this invocation took "
        f"{(time.perf_counter() - started) / 60:.1f} min\n"
    )
    print(tokenizer_table(tokenizer_rows))
    print(f"\nwinner by held-out Korean bits per byte: {winner.tokenizer_name}\n")
    print(arch_table(arch_rows))
    fair_rows = []
    if args.tokens_fair:
        kiwi_leaders = [v for v in leaders(tokenizer_rows, args.leaders) if v.pretokenize == "kiwi"]
        for variant in kiwi_leaders:
            same_size = (variant.name, Variant("none", variant.vocab_size).name)
            rows = [r for r in tokenizer_rows if r["variant"] in same_size]
            for seed in args.seeds:
                rows.append(run_row(work, dataclasses.replace(variant, budget="tokens"), seed, corpus, args))
            fair_rows.extend(rows)
        print("\nkiwi leaders at the step count of the byte-level BPE of the same size (tokens-fair):\n")
        print(tokenizer_table(fair_rows))
    (work / "rows.json").write_text(json.dumps(tokenizer_rows + arch_rows + fair_rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
