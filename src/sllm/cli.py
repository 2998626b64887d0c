"""`sllm <command>`: argument parsing only; each command calls one plain function.

Errors the user can fix (`UserError`) print one line to stderr and exit with code 2;
argparse's own errors (unknown command or flag) are folded into the same one-line form.
Heavy imports (torch) happen inside the commands, so `sllm --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from sllm.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


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

    from sllm.data.prepare import train_tokenizer
    from sllm.data.sources import expand_inputs

    cfg = _load(
        args,
        {
            "data.inputs": args.input,
            "data.text_field": args.text_field,
            "data.txt_mode": args.txt_mode,
            "tokenizer.vocab_size": args.vocab_size,
            "tokenizer.kind": args.kind,
        },
    )
    tokenizer = train_tokenizer(expand_inputs(cfg.data.inputs), cfg.data, cfg.tokenizer)
    path = tokenizer.save(Path(args.out))
    print(f"saved {path} ({tokenizer.vocab_size} tokens)")


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
            "tokenizer.path": args.tokenizer,
        },
    )
    prepare(cfg.data, cfg.tokenizer)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _load(args, {"data.dir": args.data, "train.out_dir": args.out})
    from sllm.train.loop import train

    result = train(cfg)
    if result.val_loss is not None:
        import math

        print(
            f"step {result.step}: val loss {result.val_loss:.4f}, perplexity {math.exp(result.val_loss):.2f}"
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from sllm.evaluate import evaluate_run

    results = evaluate_run(args.run, args.split, args.stride, args.batch_size, args.device, args.checkpoint)
    print(f"{'split':<6} {'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
    for r in results:
        print(f"{r.split:<6} {r.tokens:>10,} {r.loss:>8.4f} {r.perplexity:>11.2f} {r.bits_per_byte:>10.4f}")


def cmd_generate(args: argparse.Namespace) -> None:
    from sllm.infer.engine import TextGenerator

    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    from sllm.infer.sampling import SamplingParams

    SamplingParams(**sampling)  # validate before loading the model
    generator = TextGenerator.from_run(args.run, args.device, args.checkpoint)
    print(args.prompt, end="", flush=True)
    for piece in generator.stream(args.prompt, **sampling):
        print(piece, end="", flush=True)
    print()


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], help="file, directory or glob (repeatable)")
    parser.add_argument("--text-field", help="JSONL field holding the text (default: text)")
    parser.add_argument(
        "--txt-mode",
        choices=["file", "paragraph"],
        help="TXT: one document per file or per paragraph",
    )


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
    evaluate.add_argument("--data", help="sts: KorSTS .tsv or KLUE-STS .json file to score")
    run_eval = evaluate.get_default("func")

    def dispatch(args: argparse.Namespace) -> None:
        if args.task != "sts" and args.data:
            raise UserError("--data belongs to `sllm eval sts --run DIR --data FILE`; add `sts`")
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
    tok_train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    _config_args(tok_train)
    tok_train.set_defaults(func=cmd_tokenizer_train)

    prep = commands.add_parser("prepare", help="tokenize raw text into a prepared data directory")
    _source_args(prep)
    prep.add_argument("--tokenizer", help="tokenizer directory or file (default: train one)")
    prep.add_argument("--out", help="prepared data directory (data.dir)")
    prep.add_argument("--val-ratio", type=float, help="share of documents for validation")
    prep.add_argument("--test-ratio", type=float, help="share of documents for testing")
    _config_args(prep)
    prep.set_defaults(func=cmd_prepare)

    tr = commands.add_parser("train", help="pre-train a model; the same command again resumes")
    tr.add_argument("--data", help="prepared data directory (data.dir)")
    tr.add_argument("--out", help="run directory (train.out_dir)")
    _config_args(tr)
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("eval", help="loss, perplexity and bits per byte of a run over whole splits")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--split", action="append", help="split to score (repeatable; default val and test)")
    ev.add_argument("--stride", type=int, default=0, help="window stride (default: half the context)")
    ev.add_argument("--batch-size", type=int, default=0, help="windows per batch")
    ev.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    gen = commands.add_parser("generate", help="continue a prompt with a trained run")
    gen.add_argument("--run", required=True, help="run directory")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 disables")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=cmd_generate)
    _add_finetune_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        command: Callable[[argparse.Namespace], None] = args.func
        command(args)
    except UserError as error:
        print(f"sllm: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("sllm: interrupted", file=sys.stderr)
        sys.exit(130)
