"""`sllm <command>`: the argument parser; each command runs one function of `sllm.commands`.

The shorthand flags of `CONFIG_FLAGS` (`--vocab-size` is `tokenizer.vocab_size`) and the
sampling flags take their choices, help, range and default from the config's and
`SamplingParams`' fields, so none is written twice. A `UserError` (argparse's errors too) is
one stderr line and exit code 2. Every command takes `--quiet`: no progress bars
(`sllm.progress`). Nothing here imports torch, so `sllm --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from sllm import commands
from sllm.atomic import disk_full_errno
from sllm.errors import UserError
from sllm.options import add_flag, int_in
from sllm.progress import QUIET

SOURCE_FLAGS = ["--input=data.inputs", "data.text_field", "data.txt_mode"]
# Shorthand flags per command, each for one config key: `section.key` is `--key`, `--flag=section.key`
# names the flag.
CONFIG_FLAGS: dict[str, list[str]] = {
    "tokenizer train": [*SOURCE_FLAGS, "tokenizer.vocab_size", "tokenizer.kind", "tokenizer.sample_bytes",
                        "tokenizer.pretokenize"],
    "tokenizer stats": SOURCE_FLAGS,
    "prepare": [*SOURCE_FLAGS, "--tokenizer=tokenizer.path", "--out=data.dir", "data.val_ratio",
                "data.test_ratio", "--source-weight=data.input_weights", "--val-input=data.val_inputs",
                "--test-input=data.test_inputs", "data.shard_tokens",
                "--tokenizer-sample-bytes=tokenizer.sample_bytes"],
    "train": ["--data=data.dir", "--out=train.out_dir", "train.init_from"],
    "info": [],
}  # fmt: skip
MAX_NEW_TOKENS = {"generate": 100, "chat": 200}  # reply lengths; other sampling defaults: the run's
CHECKPOINT_HELP = "latest, best, step-N, epoch-N or a checkpoint directory of the run (default: latest)"
# torchrun's own parser takes `--run` for an abbreviation of its `--run-path`: `--base` passes it.
BASE_RUN_HELP = "pre-trained run directory (`--base` under torchrun)"
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", re.DOTALL)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _config_args(parser: argparse.ArgumentParser, command: str) -> None:
    """--config, the command's shorthand flags and the `section.key=value` overrides."""
    from sllm.config import SECTIONS

    parser.add_argument("--config", help="YAML config file or preset name (e.g. demo)")
    keys = []
    for shorthand in CONFIG_FLAGS[command]:
        flag, _, key = shorthand.rpartition("=")
        section, name = key.split(".")
        flag = flag or "--" + name.replace("_", "-")
        add_flag(parser, flag, SECTIONS[section], name, key, dest=key, metavar=name.upper())
        keys.append(key)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(config_keys=keys)


def _run_args(parser: argparse.ArgumentParser, command: str = "") -> None:
    """--run, --checkpoint, --device and, for `generate` and `chat`, a flag per sampling option
    but `stop`; those left out take the run's `sample` section (the seed: a fresh one)."""
    from sllm.sampling import OPTION_TYPES, RUN_OPTIONS, SamplingParams

    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    parser.add_argument("--device", default="auto")
    if command not in MAX_NEW_TOKENS:
        return
    for name, kind in OPTION_TYPES.items():
        flag = "--" + name.replace("_", "-")
        if name == "max_new_tokens":
            add_flag(parser, flag, SamplingParams, name, type=kind, default=MAX_NEW_TOKENS[command])
        elif name in RUN_OPTIONS:
            note = f"default: the run's sample.{name}"
            add_flag(parser, flag, SamplingParams, name, note, type=kind, default=None)
        else:  # the seed: a fresh one unless given
            add_flag(parser, flag, SamplingParams, name, type=kind)


def _add(group: argparse._SubParsersAction, name: str, run: Callable) -> argparse.ArgumentParser:
    """The command `name`, which runs `run`; the first line of its docstring is the help."""
    parser = group.add_parser(name, help=run.__doc__.splitlines()[0])
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def _group(group: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    subcommands = group.add_parser(name, help=help).add_subparsers(
        dest=f"{name}_command", metavar="command", parser_class=_Parser
    )
    subcommands.required = True
    return subcommands


def _add_data_commands(top: argparse._SubParsersAction) -> None:
    demo = _add(top, "demo", commands.demo)
    demo.add_argument("--data", default="data/demo", help="prepared data directory to create")
    demo.add_argument("--out", default="runs/demo", help="run directory to create")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    tokenizer = _group(top, "tokenizer", "tokenizer commands")
    train = _add(tokenizer, "train", commands.tokenizer_train)
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    _config_args(train, "tokenizer train")
    stats = _add(tokenizer, "stats", commands.tokenizer_stats)
    stats.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    _config_args(stats, "tokenizer stats")

    _config_args(_add(top, "prepare", commands.prepare), "prepare")

    from sllm.data.download import DEFAULT_SHARD_DOCS

    download = _add(top, "download", commands.download)
    download.add_argument("preset", nargs="?", help="corpus to download (see --list)")
    download.add_argument("--list", action="store_true", help="show the presets, their sources and licenses")
    download.add_argument("--out", help="directory for the shards (then: sllm prepare --input DIR)")
    download.add_argument("--max-docs", type=int, help="stop after this many documents")
    download.add_argument("--max-bytes", type=int, help="stop before the text exceeds this many UTF-8 bytes")
    download.add_argument("--shard-docs", type=int, default=DEFAULT_SHARD_DOCS, help="documents per shard")

    data = _group(top, "data", "prepared data commands")
    data_info = _add(data, "info", commands.data_info)
    data_info.add_argument("dir", help="prepared data directory")
    data_info.add_argument("--show-samples", type=int_in(0), default=0, help="decode N random windows")
    data_info.add_argument("--window-tokens", type=int_in(1), default=64, help="tokens per sample window")
    verify = _add(data, "verify", commands.data_verify)
    verify.add_argument("dir", help="prepared data directory")
    verify.add_argument("--update", action="store_true", help="record the shard checksums older data lacks")


def _add_training_commands(top: argparse._SubParsersAction) -> None:
    train = _add(top, "train", commands.train)
    batch_help = "largest micro-batch that fits, same global batch (train.micro_batch=auto)"
    train.add_argument("--find-batch-size", action="store_true", help=batch_help)
    _config_args(train, "train")

    evaluate = _add(top, "eval", commands.evaluate)
    evaluate.add_argument("task", nargs="?", choices=["sts"], help="`sts`: score an STS run on --data")
    _run_args(evaluate)
    scored = evaluate.add_mutually_exclusive_group()
    scored.add_argument("--split", action="append", help="split to score (repeatable; default val and test)")
    scored.add_argument("--text", nargs="+", metavar="FILE", help="score UTF-8 text files instead of splits")
    scored.add_argument("--mc", metavar="FILE", help="multiple-choice JSONL {context, choices, answer}")
    evaluate.add_argument(
        "--data", help="prepared data (default: the run's); sts: KorSTS .tsv, KLUE-STS .json"
    )
    evaluate.add_argument(
        "--stride", type=int_in(0), default=0, help="window stride (0: the run's eval.stride)"
    )
    evaluate.add_argument(
        "--batch-size", type=int_in(0), default=0, help="windows per batch (0: eval.batch_size)"
    )

    finetune = _group(top, "finetune", "fine-tune a pre-trained run on a task")
    sts = _add(finetune, "sts", commands.finetune_sts)
    sts.add_argument("--run", "--base", dest="run", required=True, help=BASE_RUN_HELP + " (the backbone)")
    sts.add_argument("--train", required=True, help="training pairs: KorSTS .tsv or KLUE-STS .json")
    sts.add_argument("--dev", required=True, help="dev pairs, scored each epoch; the best epoch is kept")
    sts.add_argument("--out", required=True, help="run directory to create")
    sts.add_argument("overrides", nargs="*", metavar="sts.key=value", help="settings, e.g. sts.freeze=true")
    sft = _add(finetune, "sft", commands.finetune_sft)
    sft.add_argument("--run", "--base", dest="run", required=True, help=BASE_RUN_HELP)
    sft.add_argument("--data", required=True, help="instruction data: .json, .jsonl or .csv")
    sft.add_argument("--out", required=True, help="run directory to create")
    sft.add_argument("overrides", nargs="*", metavar="sft.key=value", help="settings, e.g. sft.epochs=3")

    info = _add(top, "info", commands.info)
    info.add_argument("--run", help="run directory")
    info.add_argument("--micro-batch", type=int, help="micro-batch for the memory estimate")
    info.add_argument("--show-config", action="store_true", help="print the resolved config as YAML")
    _config_args(info, "info")
    report = _add(top, "report", commands.report)
    report.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    report.add_argument("--out", help="where to write report.md and plots/ (default: the first run)")
    queue = _add(top, "queue", commands.queue)
    queue.add_argument("file", help="one experiment per line; # starts a comment")
    queue.set_defaults(parse_line=lambda argv: _parse(build_parser(), argv))  # checks every line first


def _add_inference_commands(top: argparse._SubParsersAction) -> None:
    from sllm.infer.server_limits import ServerLimits
    from sllm.sampling import MAX_STOP_STRINGS

    generate = _add(top, "generate", commands.generate)
    _run_args(generate, "generate")
    generate.add_argument("--prompt", required=True, help="text to continue")
    _run_args(_add(top, "chat", commands.chat), "chat")

    compile_help = "CUDA: torch.compile the CUDA-graph decode step (once per batch shape; gain unmeasured)"
    serve = _add(top, "serve", commands.serve)
    serve.description = (
        "An OpenAI-compatible API under /v1 and a chat page at /. A request over a limit below, with "
        f"a prompt longer than the context or more than {MAX_STOP_STRINGS} stop strings is refused "
        "with OpenAI's error body before any work; tokenizing and generating run off the event loop."
    )
    _run_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int_in(1, 65535), default=8000)
    for limit in dataclasses.fields(ServerLimits):
        flag = "--" + limit.name.replace("_", "-")
        add_flag(serve, flag, ServerLimits, limit.name, type=int, default=limit.default, metavar="N")
    serve.add_argument("--compile", action="store_true", help=compile_help)
    bench = _add(_group(top, "bench", "speed benchmarks"), "generate", commands.bench_generate)
    _run_args(bench)
    bench.add_argument("--batch-sizes", type=int_in(1), nargs="+", default=[1, 8, 32, 64])
    bench.add_argument("--prompt-tokens", type=int_in(1), default=16)
    bench.add_argument("--new-tokens", type=int_in(2), help="per prompt (default: 128, or what fits)")
    bench.add_argument("--threads", type=int_in(0), default=0, help="CPU threads; 0 keeps torch's default")
    bench.add_argument("--compile", action="store_true", help=compile_help)

    export = _add(top, "export", commands.export)
    export.add_argument("--run", required=True, help="run directory")
    export.add_argument("--out", required=True, help="directory to create (a .gguf file with --format gguf)")
    export.add_argument(
        "--format", choices=["hf", "gguf"], default="hf", help="hf: transformers; gguf: llama.cpp"
    )
    export.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], help="gguf weights (default f16)")
    export.add_argument("--checkpoint", default="latest", help=CHECKPOINT_HELP)
    check_help = "load the export with transformers (gguf: llama-cpp-python), compare logits"
    export.add_argument("--check", action="store_true", help=check_help)
    imported = _add(top, "import", commands.import_hf)
    imported.add_argument("--hf", required=True, help="directory with config.json, weights, tokenizer.json")
    imported.add_argument("--out", required=True, help="run directory to create")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sllm", description="Build a small GPT-style language model from scratch.")
    top = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    top.required = True
    _add_data_commands(top)
    _add_training_commands(top)
    _add_inference_commands(top)
    return parser


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
        quiet = QUIET.set(args.quiet)
        try:
            command(args)
        finally:
            QUIET.reset(quiet)
    except UserError as error:
        print(f"sllm: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("sllm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # a full disk under a writer that names no directory of its own
        code = disk_full_errno(error)
        if code is None:
            raise
        where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
        print(f"sllm: error: the disk is full ({os.strerror(code)}){where}; free some space and run "
              "the same command again", file=sys.stderr)  # fmt: skip
        sys.exit(UserError.exit_code)
