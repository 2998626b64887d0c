"""`sllm <command>`: argument parsing only; each command calls one plain function.

Errors the user can fix (`UserError`) print one line to stderr and exit with code 2;
argparse's own errors (unknown command or flag) are folded into the same one-line form.
Heavy imports (torch) happen inside the commands, so `sllm --help` is instant.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from sllm.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {span}")
        return value

    return parse


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file or preset name (e.g. demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _load(args: argparse.Namespace, shorthands: dict[str, object]):
    """The config file plus dotted overrides; flags like --data are shorthands for keys."""
    import json

    from sllm.config import load_config

    overrides = list(args.overrides)
    for key, value in shorthands.items():
        if value is not None and value != []:
            overrides.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    return load_config(args.config, overrides)


def cmd_demo(args: argparse.Namespace) -> None:
    from sllm.demo import run_demo

    run_demo(args.overrides, data_dir=args.data, run_dir=args.out)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from sllm.atomic import ensure_writable_dir
    from sllm.data.mixture import resolve_sources
    from sllm.data.prepare import train_tokenizer
    from sllm.tokenizer import TOKENIZER_FILE

    cfg = _load(
        args,
        {
            "data.inputs": args.input,
            "data.text_field": args.text_field,
            "data.txt_mode": args.txt_mode,
            "tokenizer.vocab_size": args.vocab_size,
            "tokenizer.kind": args.kind,
            "tokenizer.sample_bytes": args.sample_bytes,
        },
    )
    out = Path(args.out)
    if (out / TOKENIZER_FILE).exists():
        raise UserError(f"{out} already holds a {TOKENIZER_FILE}; choose a new --out or remove that file")
    ensure_writable_dir(out, "tokenizer")
    tokenizer = train_tokenizer(resolve_sources(cfg.data), cfg.data, cfg.tokenizer)
    path = tokenizer.save(out)
    print(f"saved {path} ({tokenizer.vocab_size} tokens)")


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from sllm.data.sources import ReadOptions, expand_inputs
    from sllm.tokenizer import load_tokenizer
    from sllm.tokenizer_stats import format_stats, measure_inputs

    shorthands = {
        "data.inputs": args.input,
        "data.text_field": args.text_field,
        "data.txt_mode": args.txt_mode,
    }
    cfg = _load(args, shorthands)
    tokenizer = load_tokenizer(args.tokenizer)
    stats = measure_inputs(tokenizer, expand_inputs(cfg.data.inputs), ReadOptions.from_config(cfg.data))
    print(format_stats(stats))


def cmd_prepare(args: argparse.Namespace) -> None:
    from sllm.data.prepare import prepare

    cfg = _load(
        args,
        {
            "data.inputs": args.input,
            "data.dir": args.out,
            "data.text_field": args.text_field,
            "data.txt_mode": args.txt_mode,
            "data.val_ratio": args.val_ratio,
            "data.test_ratio": args.test_ratio,
            "data.input_weights": args.source_weight,
            "data.val_inputs": args.val_input,
            "data.test_inputs": args.test_input,
            "data.shard_tokens": args.shard_tokens,
            "tokenizer.path": args.tokenizer,
            "tokenizer.sample_bytes": args.tokenizer_sample_bytes,
        },
    )
    prepare(cfg.data, cfg.tokenizer)


def cmd_download(args: argparse.Namespace) -> None:
    from sllm.data.download import describe, download, format_presets, get_preset

    if args.list:
        print(format_presets())
        return
    if not args.preset or not args.out:
        raise UserError(
            "sllm download needs a PRESET and --out DIR; `sllm download --list` shows the presets"
        )
    preset = get_preset(args.preset)
    print(f"downloading {preset.name} from {preset.source} into {args.out}", flush=True)
    print(describe(download(args.preset, args.out, args.max_docs, args.max_bytes, args.shard_docs)))


def _add_download_command(commands) -> None:
    from sllm.data.download import DEFAULT_SHARD_DOCS

    parser = commands.add_parser(
        "download", help="stream a well-known corpus from the Hugging Face hub into JSONL shards"
    )
    parser.add_argument("preset", nargs="?", help="corpus to download (see --list)")
    parser.add_argument("--list", action="store_true", help="show the presets, their sources and licenses")
    parser.add_argument("--out", help="directory for the shards (then: sllm prepare --input DIR)")
    parser.add_argument("--max-docs", type=int, help="stop after this many documents")
    parser.add_argument("--max-bytes", type=int, help="stop before the text exceeds this many UTF-8 bytes")
    parser.add_argument(
        "--shard-docs", type=int, default=DEFAULT_SHARD_DOCS, help="documents per JSONL shard"
    )
    parser.set_defaults(func=cmd_download)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _load(args, {"data.dir": args.data, "train.out_dir": args.out, "train.init_from": args.init_from})
    from sllm.train.trainer import train

    if args.find_batch_size:
        from sllm.train.batch_size import find_batch_size
        from sllm.train.distributed import launched_world_size

        find_batch_size(cfg, launched_world_size())

    result = train(cfg)
    if result.val_loss is not None and result.is_main:
        import math

        scores = f"val loss {result.val_loss:.4f}, perplexity {math.exp(result.val_loss):.2f}"
        if result.val_step == result.step:
            print(f"step {result.step}: {scores}")
        else:  # stopped between evaluations: the scores are older than the weights
            print(f"step {result.step}: last evaluated at step {result.val_step}: {scores}")


def cmd_eval(args: argparse.Namespace) -> None:
    from sllm.evaluate import evaluate_run, evaluate_texts

    if args.data and (args.text or args.mc):
        raise UserError("--data gives prepared data to score by split; --text and --mc score files: drop it")
    if args.mc:
        _eval_multiple_choice(args)
        return
    if args.text:
        results = evaluate_texts(
            args.run, args.text, args.stride, args.batch_size, args.device, args.checkpoint
        )
    else:
        results = evaluate_run(
            args.run, args.split, args.stride, args.batch_size, args.device, args.checkpoint, args.data
        )
    width = max(6, *(len(r.split) for r in results))
    header = f"{'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'top-1':>7} {'top-5':>7}"
    print(f"{'split':<{width}} {header}")
    for r in results:
        numbers = f"{r.tokens:>10,} {r.loss:>8.4f} {r.perplexity:>11.2f} {r.bits_per_byte:>10.4f}"
        accuracy = f"{r.scores.accuracy:>7.1%} {r.scores.top5_accuracy:>7.1%}"
        print(f"{r.split:<{width}} {numbers} {accuracy}")


def _eval_multiple_choice(args: argparse.Namespace) -> None:
    from sllm.multiple_choice import evaluate_multiple_choice

    result = evaluate_multiple_choice(args.run, args.mc, args.device, args.checkpoint)
    print(
        f"{args.mc}: {result.questions} questions, accuracy {result.accuracy:.4f}, "
        f"accuracy_norm {result.accuracy_norm:.4f} (chance {result.chance:.4f})"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from sllm.infer.chat import PLAIN, Message, load_chat_template
    from sllm.infer.engine import TextGenerator

    template = load_chat_template(args.run)
    params = _sampling_params(args, stop=template.stop)
    generator = TextGenerator.from_run(args.run, args.device, args.checkpoint)
    if template == PLAIN:  # a base model continues the text
        prompt = args.prompt
        print(prompt, end="", flush=True)
    else:  # an instruction-tuned model answers it
        prompt = template.render([Message("user", args.prompt)])
    for _, piece in generator.stream_batch([prompt], params):
        print(piece, end="", flush=True)
    print()


def cmd_info(args: argparse.Namespace) -> None:
    from sllm.info import describe_costs, resolve_for_info

    if not (args.run or args.config):
        raise UserError("sllm info needs --run DIR or --config FILE")
    print(describe_costs(resolve_for_info(args.run, args.config, args.overrides), args.micro_batch))


def cmd_data_info(args: argparse.Namespace) -> None:
    from sllm.data.inspect import describe_data

    print(describe_data(args.dir, args.show_samples, args.window_tokens))


def cmd_report(args: argparse.Namespace) -> None:
    from sllm.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")


def cmd_queue(args: argparse.Namespace) -> None:
    from sllm.queue import run_queue

    entries = run_queue(args.file)
    if any(e.status == "failed" for e in entries):
        sys.exit(1)


def _add_experiment_commands(commands) -> None:
    report = commands.add_parser("report", help="plots and a markdown summary of one or more runs")
    report.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    report.add_argument("--out", help="where to write report.md and plots/ (default: the first run)")
    report.set_defaults(func=cmd_report)

    queue = commands.add_parser(
        "queue", help="run the `sllm train` argument lists of a file, one after another"
    )
    queue.add_argument("file", help="one experiment per line; # starts a comment")
    queue.set_defaults(func=cmd_queue)


def _add_inspection_commands(commands) -> None:
    info = commands.add_parser(
        "info", help="parameters, FLOPs per token, memory and KV-cache size of a model"
    )
    info.add_argument("--run", help="run directory")
    info.add_argument("--micro-batch", type=int, help="micro-batch for the memory estimate")
    _config_args(info)
    info.set_defaults(func=cmd_info)

    data = commands.add_parser("data", help="prepared data commands")
    data_commands = data.add_subparsers(dest="data_command", metavar="command", parser_class=_Parser)
    data_commands.required = True
    data_info = data_commands.add_parser("info", help="describe a prepared data directory")
    data_info.add_argument("dir", help="prepared data directory")
    data_info.add_argument(
        "--show-samples", type=_int_in(0), default=0, help="decode N random training windows"
    )
    data_info.add_argument("--window-tokens", type=_int_in(1), default=64, help="tokens per sample window")
    data_info.set_defaults(func=cmd_data_info)


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], help="file, directory or glob (repeatable)")
    parser.add_argument(
        "--text-field", help="field or column holding the text, dotted for nested (default: text)"
    )
    parser.add_argument(
        "--txt-mode",
        choices=["file", "paragraph"],
        help="TXT: one document per file or per paragraph",
    )


def _sampling_params(args: argparse.Namespace, **extra):
    """Validated sampling settings from the flags `_run_args` adds, the run's `sample` section
    filling those not given. The flags and --device are checked before the run is read."""
    from pathlib import Path

    from sllm.config import SampleConfig
    from sllm.infer.sampling import SamplingParams
    from sllm.run import read_run_config
    from sllm.runtime import select_device

    flags = {name: getattr(args, name) for name in RUN_SAMPLING}

    def params(sample: SampleConfig) -> SamplingParams:
        chosen = {name: getattr(sample, name) if value is None else value for name, value in flags.items()}
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, min_p=args.min_p, seed=args.seed, **chosen, **extra
        )

    params(SampleConfig())
    select_device(args.device)
    return params(read_run_config(Path(args.run)).sample)


def cmd_chat(args: argparse.Namespace) -> None:
    import sys

    from sllm.infer.chat import ChatSession, load_chat_template, run_chat
    from sllm.infer.engine import TextGenerator

    params = _sampling_params(args)
    template = load_chat_template(args.run)
    generator = TextGenerator.from_run(args.run, args.device, args.checkpoint)
    run_chat(ChatSession(generator, template, params, sys.stdout), sys.stdin)


def cmd_serve(args: argparse.Namespace) -> None:
    from sllm.infer.server import serve

    serve(args.run, args.host, args.port, args.device, args.checkpoint, args.max_tokens_limit, args.compile)


def cmd_bench_generate(args: argparse.Namespace) -> None:
    from sllm.infer.bench import bench_generate, format_table

    rows = bench_generate(
        args.run,
        args.device,
        args.batch_sizes,
        args.prompt_tokens,
        args.new_tokens,
        args.threads,
        args.compile,
    )
    print(format_table(rows))


def _compile_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile", action="store_true",
        help="CUDA: torch.compile the CUDA-graph decode step (once per batch shape; gain unmeasured)",
    )  # fmt: skip


RUN_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")  # default: the run's `sample`


def _run_args(parser: argparse.ArgumentParser, sampling: bool = True, max_new_tokens: int = 200) -> None:
    """--run, --checkpoint, --device and, with `sampling`, the sampling flags. Those left out
    take the run's `sample` section (what its training samples and its export use)."""
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    parser.add_argument("--device", default="auto")
    if not sampling:
        return
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="length limit")
    for name, kind, note in (
        ("temperature", float, "0 is greedy"),
        ("top_k", int, "0 disables"),
        ("top_p", float, "1 disables"),
        ("repetition_penalty", float, "1 disables"),
    ):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=None, help=f"{note}; default: the run's sample.{name}")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    parser.add_argument("--seed", type=int, default=None)


def _add_inference_commands(commands: argparse._SubParsersAction) -> None:
    """chat, serve and bench generate (src/sllm/infer)."""
    chat = commands.add_parser("chat", help="multi-turn chat with a run in the terminal")
    _run_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page")
    _run_args(serve, sampling=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_int_in(1, 65535), default=8000)
    serve.add_argument(
        "--max-tokens-limit", type=_int_in(1), default=1024, help="largest max_tokens accepted"
    )
    _compile_arg(serve)
    serve.set_defaults(func=cmd_serve)

    bench = commands.add_parser("bench", help="speed benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="command", parser_class=_Parser)
    bench_commands.required = True
    bench_gen = bench_commands.add_parser("generate", help="time to first token, decode and prefill speed")
    _run_args(bench_gen, sampling=False)
    bench_gen.add_argument("--batch-sizes", type=_int_in(1), nargs="+", default=[1, 8, 32, 64])
    bench_gen.add_argument("--prompt-tokens", type=_int_in(1), default=16)
    bench_gen.add_argument(
        "--new-tokens", type=_int_in(2), help="per prompt (default: 128, or as many as fit the context)"
    )
    bench_gen.add_argument(
        "--threads", type=_int_in(0), default=0, help="CPU threads; 0 keeps torch's default"
    )
    _compile_arg(bench_gen)
    bench_gen.set_defaults(func=cmd_bench_generate)


def cmd_finetune_sts(args: argparse.Namespace) -> None:
    from sllm.finetune.sts import finetune_sts, sts_config

    cfg = sts_config(args.overrides)
    best = finetune_sts(args.run, args.train, args.dev, args.out, cfg)
    print(
        f"best dev spearman {best.dev.spearman:.2f}, pearson {best.dev.pearson:.2f} "
        f"(epoch {best.epoch}); saved to {args.out}"
    )


def cmd_finetune_sft(args: argparse.Namespace) -> None:
    from sllm.finetune.sft import finetune_sft, sft_config

    result = finetune_sft(args.run, args.data, args.out, sft_config(args.overrides))
    held_out = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(f"step {result.step}: held-out loss {held_out}; saved to {args.out}")


def cmd_eval_sts(args: argparse.Namespace) -> None:
    from sllm.finetune.sts import evaluate_sts

    if not args.data:
        raise UserError("`sllm eval sts` needs --data FILE (a KorSTS .tsv or KLUE-STS .json file)")
    scores, summary = evaluate_sts(args.run, args.data, args.device)
    print(summary)
    print(f"{'n':>6} {'spearman':>9} {'pearson':>8}  (x100)")
    print(f"{scores.n:>6} {scores.spearman:>9.2f} {scores.pearson:>8.2f}")


def _add_finetune_commands(commands: argparse._SubParsersAction) -> None:
    """`sllm finetune sts|sft`, and `sllm eval sts` beside the plain `sllm eval --run DIR`."""
    finetune = commands.add_parser("finetune", help="fine-tune a pre-trained run on a task")
    tasks = finetune.add_subparsers(dest="finetune_command", metavar="task", parser_class=_Parser)
    tasks.required = True
    sts = tasks.add_parser("sts", help="sentence similarity regression (KorSTS, KLUE-STS); Spearman on dev")
    sts.add_argument("--run", required=True, help="pre-trained run directory (the backbone)")
    sts.add_argument("--train", required=True, help="training pairs: KorSTS .tsv or KLUE-STS .json")
    sts.add_argument("--dev", required=True, help="dev pairs, scored each epoch; the best epoch is kept")
    sts.add_argument("--out", required=True, help="run directory to create")
    sts.add_argument("overrides", nargs="*", metavar="sts.key=value", help="settings, e.g. sts.freeze=true")
    sts.set_defaults(func=cmd_finetune_sts)
    sft = tasks.add_parser("sft", help="instruction tuning on Alpaca JSON/JSONL, chat JSONL or Q/A CSV")
    sft.add_argument("--run", required=True, help="pre-trained run directory")
    sft.add_argument("--data", required=True, help="instruction data: .json, .jsonl or .csv")
    sft.add_argument("--out", required=True, help="run directory to create")
    sft.add_argument("overrides", nargs="*", metavar="sft.key=value", help="settings, e.g. sft.epochs=3")
    sft.set_defaults(func=cmd_finetune_sft)

    evaluate = commands.choices["eval"]
    evaluate.add_argument("task", nargs="?", choices=["sts"], help="`sts`: score an STS run on --data")
    evaluate.add_argument(
        "--data",
        help="prepared data directory whose splits to score (default: the run's data.dir); "
        "sts: KorSTS .tsv or KLUE-STS .json file to score",
    )
    run_eval = evaluate.get_default("func")

    def dispatch(args: argparse.Namespace) -> None:
        from pathlib import Path

        if args.task != "sts" and args.data and Path(args.data).is_file():
            raise UserError(
                f"--data {args.data} is a file, not prepared data; to score an STS file, add `sts`"
            )
        (cmd_eval_sts if args.task == "sts" else run_eval)(args)

    evaluate.set_defaults(func=dispatch)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sllm", description="Build a small GPT-style language model from scratch.")
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo", help="train a small model on the bundled Korean legal corpus (CPU, minutes)"
    )
    demo.add_argument("--data", default="data/demo", help="prepared data directory to create")
    demo.add_argument("--out", default="runs/demo", help="run directory to create")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    demo.set_defaults(func=cmd_demo)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer commands")
    tokenizer_commands = tokenizer.add_subparsers(
        dest="tokenizer_command", metavar="command", parser_class=_Parser
    )
    tokenizer_commands.required = True
    tok_train = tokenizer_commands.add_parser("train", help="train a BPE (or char) tokenizer on your text")
    _source_args(tok_train)
    tok_train.add_argument("--vocab-size", type=int, help="vocabulary size (default 8000)")
    tok_train.add_argument("--kind", choices=["bpe", "char"], help="tokenizer kind (default bpe)")
    tok_train.add_argument("--sample-bytes", type=int, help="train on this much text (default 1 GB)")
    tok_train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    _config_args(tok_train)
    tok_train.set_defaults(func=cmd_tokenizer_train)
    tok_stats = tokenizer_commands.add_parser(
        "stats", help="tokens per char/byte/word for Korean and English, fallback share, vocab use"
    )
    _source_args(tok_stats)
    tok_stats.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    _config_args(tok_stats)
    tok_stats.set_defaults(func=cmd_tokenizer_stats)

    prep = commands.add_parser("prepare", help="tokenize raw text into a prepared data directory")
    _source_args(prep)
    prep.add_argument("--tokenizer", help="tokenizer directory or file (default: train one)")
    prep.add_argument("--out", help="prepared data directory (data.dir)")
    prep.add_argument("--val-ratio", type=float, help="share of documents for validation")
    prep.add_argument("--test-ratio", type=float, help="share of documents for testing")
    prep.add_argument(
        "--source-weight",
        type=float,
        action="append",
        default=[],
        help="one per --input, in order: each input is a source, sampled in training by its weight",
    )
    prep.add_argument(
        "--val-input",
        action="append",
        default=[],
        help="held-out validation file (repeatable)",
    )
    prep.add_argument("--test-input", action="append", default=[], help="held-out test file (repeatable)")
    prep.add_argument("--shard-tokens", type=int, help="tokens per shard file (default 100,000,000)")
    prep.add_argument(
        "--tokenizer-sample-bytes", type=int, help="train the tokenizer on this much text (default 1 GB)"
    )
    _config_args(prep)
    prep.set_defaults(func=cmd_prepare)
    _add_download_command(commands)

    tr = commands.add_parser("train", help="pre-train a model; the same command again resumes")
    tr.add_argument("--data", help="prepared data directory (data.dir)")
    tr.add_argument("--out", help="run directory (train.out_dir)")
    tr.add_argument("--init-from", help="start from another run's weights (train.init_from)")
    tr.add_argument(
        "--find-batch-size",
        action="store_true",
        help="largest micro-batch that fits, same global batch (train.micro_batch=auto)",
    )
    _config_args(tr)
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser(
        "eval", help="loss, perplexity, bits per byte (splits or text files); multiple-choice accuracy"
    )
    ev.add_argument("--run", required=True, help="run directory")
    scored = ev.add_mutually_exclusive_group()
    scored.add_argument("--split", action="append", help="split to score (repeatable; default val and test)")
    scored.add_argument("--text", nargs="+", metavar="FILE", help="score UTF-8 text files instead of splits")
    scored.add_argument("--mc", metavar="FILE", help="multiple-choice JSONL {context, choices, answer}")
    ev.add_argument("--stride", type=_int_in(0), default=0, help="window stride (default: half the context)")
    ev.add_argument("--batch-size", type=_int_in(0), default=0, help="windows per batch (0: eval.batch_size)")
    ev.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    gen = commands.add_parser("generate", help="continue a prompt with a trained run")
    _run_args(gen, max_new_tokens=100)
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.set_defaults(func=cmd_generate)
    _add_inspection_commands(commands)
    _add_experiment_commands(commands)
    _add_hf_commands(commands)
    _add_inference_commands(commands)
    _add_finetune_commands(commands)
    return parser


def cmd_export(args: argparse.Namespace) -> None:
    from sllm.export import check_export, export_run

    out = export_run(args.run, args.out, args.checkpoint)
    print(f"exported {args.run} to {out}")
    if args.check:
        difference = check_export(args.run, out, args.checkpoint)
        print(f"checked with transformers: largest logit difference {difference:.2e}")


def cmd_import(args: argparse.Namespace) -> None:
    from sllm.export import import_hf

    out = import_hf(args.hf, args.out)
    print(f"imported {args.hf} into {out}; generate with `sllm generate --run {out}`, or continue training:")
    print(f"  sllm prepare --config {out}/config.yaml --input TEXT && sllm train --config {out}/config.yaml")


def _add_hf_commands(commands) -> None:
    """`sllm export` and `sllm import`: to and from the Hugging Face format."""
    export = commands.add_parser("export", help="write a run as a Hugging Face model directory")
    export.add_argument("--run", required=True, help="run directory")
    export.add_argument("--out", required=True, help="directory to create")
    export.add_argument("--format", choices=["hf"], default="hf", help="output format")
    export.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    export.add_argument(
        "--check", action="store_true", help="load the export with transformers, compare logits"
    )
    export.set_defaults(func=cmd_export)

    imp = commands.add_parser("import", help="make a run from a Hugging Face GPT-2 model directory")
    imp.add_argument("--hf", required=True, help="directory with config.json, weights and tokenizer.json")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.set_defaults(func=cmd_import)


OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", re.DOTALL)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but `section.key=value` overrides may also follow the options (argparse
    takes positionals only in one block)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not hasattr(args, "overrides") or not all(OVERRIDE.fullmatch(extra) for extra in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = _parse(build_parser(), argv)
        command: Callable[[argparse.Namespace], None] = args.func
        command(args)
    except UserError as error:
        print(f"sllm: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("sllm: interrupted", file=sys.stderr)
        sys.exit(130)
