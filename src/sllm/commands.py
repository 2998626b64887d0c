"""Each `sllm` command's body: build the config, call the one function that does the work, print.

The first line of a function's docstring is the command's help (`sllm.cli`). Heavy modules
(torch) are imported inside the functions, so parsing and `--help` stay instant.
"""

from __future__ import annotations

import dataclasses
import sys
from argparse import Namespace
from pathlib import Path

from sllm.config import config_from_args
from sllm.errors import UserError
from sllm.infer.server_limits import ServerLimits


def sampling_params(args: Namespace, **extra):
    """The sampling flags given, over the run's `sample` section (flags checked before the run is read)."""
    from sllm.run import read_run_config
    from sllm.runtime import select_device
    from sllm.sampling import SamplingParams, run_defaults

    names = [f.name for f in dataclasses.fields(SamplingParams) if hasattr(args, f.name)]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    SamplingParams(**given)
    select_device(args.device)
    return dataclasses.replace(run_defaults(read_run_config(Path(args.run)).sample), **given, **extra)


def demo(args: Namespace) -> None:
    """train a small model on the bundled Korean legal corpus (CPU, minutes)"""
    from sllm.demo import run_demo

    run_demo(args.overrides, data_dir=args.data, run_dir=args.out)


def tokenizer_train(args: Namespace) -> None:
    """train a BPE, char or word tokenizer on your text"""
    from sllm.atomic import ensure_writable_dir, writing_to
    from sllm.data.mixture import resolve_sources
    from sllm.data.prepare import train_tokenizer
    from sllm.tokenizer import TOKENIZER_FILE

    cfg = config_from_args(args)
    out = Path(args.out)
    if (out / TOKENIZER_FILE).exists():
        raise UserError(f"{out} already holds a {TOKENIZER_FILE}; choose a new --out or remove that file")
    ensure_writable_dir(out, "tokenizer")
    tokenizer = train_tokenizer(resolve_sources(cfg.data), cfg.data, cfg.tokenizer)
    with writing_to(out, "tokenizer"):
        print(f"saved {tokenizer.save(out)} ({tokenizer.vocab_size} tokens)")


def tokenizer_stats(args: Namespace) -> None:
    """tokens per char/byte/word for Korean and English, fallback share, vocab use"""
    from sllm.data.sources import ReadOptions, SourceStats, expand_inputs, read_documents
    from sllm.tokenizer import load_tokenizer
    from sllm.tokenizer_stats import format_stats, measure

    data = config_from_args(args).data
    documents = read_documents(expand_inputs(data.inputs), ReadOptions.from_config(data), SourceStats())
    print(format_stats(measure(load_tokenizer(args.tokenizer), documents)))


def prepare(args: Namespace) -> None:
    """tokenize raw text into a prepared data directory"""
    from sllm.data.prepare import prepare

    cfg = config_from_args(args)
    prepare(cfg.data, cfg.tokenizer)


def download(args: Namespace) -> None:
    """stream a well-known corpus from the Hugging Face hub into JSONL shards"""
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


def train(args: Namespace) -> None:
    """pre-train a model; the same command again resumes"""
    import math

    from sllm.train.trainer import train

    cfg = config_from_args(args)
    if args.find_batch_size:
        from sllm.train.batch_size import find_batch_size
        from sllm.train.distributed import launched_world_size

        find_batch_size(cfg, launched_world_size())
    result = train(cfg)
    if result.val_loss is not None and result.is_main:
        scores = f"val loss {result.val_loss:.4f}, perplexity {math.exp(result.val_loss):.2f}"
        if result.val_step == result.step:
            print(f"step {result.step}: {scores}")
        else:  # stopped between evaluations: the scores are older than the weights
            print(f"step {result.step}: last evaluated at step {result.val_step}: {scores}")


def evaluate(args: Namespace) -> None:
    """loss, perplexity, bits per byte (splits or text files); multiple-choice accuracy; STS scores"""
    if args.task == "sts":
        from sllm.finetune.sts import evaluate_sts

        if not args.data:
            raise UserError("`sllm eval sts` needs --data FILE (a KorSTS .tsv or KLUE-STS .json file)")
        scores, summary = evaluate_sts(args.run, args.data, args.device)
        print(f"{summary}\n{'n':>6} {'spearman':>9} {'pearson':>8}  (x100)")
        print(f"{scores.n:>6} {scores.spearman:>9.2f} {scores.pearson:>8.2f}")
        return
    if args.data and Path(args.data).is_file():
        raise UserError(f"--data {args.data} is a file, not prepared data; to score an STS file, add `sts`")
    if args.data and (args.text or args.mc):
        raise UserError("--data gives prepared data to score by split; --text and --mc score files: drop it")
    if args.mc:
        from sllm.multiple_choice import evaluate_multiple_choice

        result = evaluate_multiple_choice(args.run, args.mc, args.device, args.checkpoint)
        print(
            f"{args.mc}: {result.questions} questions, accuracy {result.accuracy:.4f}, "
            f"accuracy_norm {result.accuracy_norm:.4f} (chance {result.chance:.4f})"
        )
        return
    from sllm.evaluate import SCRIPT_GROUPS, evaluate_run, evaluate_texts

    options = (args.stride, args.batch_size, args.device, args.checkpoint)
    if args.text:
        results = evaluate_texts(args.run, args.text, *options)
    else:
        results = evaluate_run(args.run, args.split, *options, args.data)
    width = max(6, *(len(r.split) for r in results))
    header = f"{'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'top-1':>7} {'top-5':>7}"
    print(f"{'split':<{width}} {header}" + "".join(f" {'bpb ' + g:>9}" for g in SCRIPT_GROUPS))
    for r in results:
        numbers = f"{r.tokens:>10,} {r.loss:>8.4f} {r.perplexity:>11.2f} {r.bits_per_byte:>10.4f}"
        by_script = r.scores.script_bits_per_byte(r.script_bytes)
        scripts = "".join(f" {by_script[g]:>9.4f}" if g in by_script else f" {'-':>9}" for g in SCRIPT_GROUPS)
        print(
            f"{r.split:<{width}} {numbers} {r.scores.accuracy:>7.1%} {r.scores.top5_accuracy:>7.1%}{scripts}"
        )


def generate(args: Namespace) -> None:
    """continue a prompt with a trained run"""
    from sllm.infer.chat import note_if_ended_at_once
    from sllm.infer.chat_template import PLAIN, Message, load_chat_template
    from sllm.infer.engine import TextGenerator

    template = load_chat_template(args.run)
    params = sampling_params(args, stop=template.stop)
    generator = TextGenerator.from_run(args.run, args.device, args.checkpoint)
    if template == PLAIN:  # a base model continues the text
        prompt = args.prompt
        print(prompt + generator.tokenizer.separator, end="", flush=True)
    else:  # an instruction-tuned model answers it
        prompt = template.render([Message("user", args.prompt)])
    stream = generator.stream_batch([prompt], params)
    for _, piece in stream:
        print(piece, end="", flush=True)
    print()
    note_if_ended_at_once(stream, "--min-new-tokens N")


def chat(args: Namespace) -> None:
    """multi-turn chat with a run in the terminal"""
    from sllm.infer.chat import ChatSession, run_chat
    from sllm.infer.chat_template import load_chat_template
    from sllm.infer.engine import TextGenerator

    params = sampling_params(args)
    template = load_chat_template(args.run)
    generator = TextGenerator.from_run(args.run, args.device, args.checkpoint)
    run_chat(ChatSession(generator, template, params, sys.stdout), sys.stdin)


def serve(args: Namespace) -> None:
    """OpenAI-compatible HTTP API and a web chat page"""
    from sllm.infer.server import serve

    serve(args.run, args.host, args.port, args.device, args.checkpoint, serve_limits(args), args.compile)


def serve_limits(args: Namespace) -> ServerLimits:
    """The `ServerLimits` the flags of `sllm serve` set."""
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})


def bench_generate(args: Namespace) -> None:
    """time to first token, decode and prefill speed"""
    from sllm.infer.bench import bench_generate, format_table

    sizes, prompt_tokens, new_tokens = args.batch_sizes, args.prompt_tokens, args.new_tokens
    rows = bench_generate(args.run, args.device, sizes, prompt_tokens, new_tokens, args.threads, args.compile)
    print(format_table(rows))


def info(args: Namespace) -> None:
    """parameters, FLOPs per token, memory and KV-cache size of a model"""
    from sllm.info import describe_costs, resolve_for_info

    if not (args.run or args.config):
        raise UserError("sllm info needs --run DIR or --config FILE")
    if args.show_config:
        from sllm.config import config_yaml
        from sllm.run import read_run_config

        print(config_yaml(read_run_config(Path(args.run)) if args.run else config_from_args(args)), end="")
        return
    print(describe_costs(resolve_for_info(args.run, args.config, args.overrides), args.micro_batch))


def data_info(args: Namespace) -> None:
    """describe a prepared data directory"""
    from sllm.data.inspect import describe_data

    print(describe_data(args.dir, args.show_samples, args.window_tokens))


def data_verify(args: Namespace) -> None:
    """check every shard of a prepared data directory: size, token ids, sha256"""
    from sllm.data.verify import verify_data

    print(verify_data(Path(args.dir), args.update))


def report(args: Namespace) -> None:
    """plots and a markdown summary of one or more runs"""
    from sllm.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")


def queue(args: Namespace) -> None:
    """run the experiments of a file one after another, every line checked first"""
    from sllm.queue import run_queue

    if any(e.status == "failed" for e in run_queue(args.file, args.parse_line)):
        sys.exit(1)


def finetune_sts(args: Namespace) -> None:
    """sentence similarity regression (KorSTS, KLUE-STS); Spearman on dev"""
    from sllm.finetune.sts import finetune_sts, sts_config

    best = finetune_sts(args.run, args.train, args.dev, args.out, sts_config(args.overrides))
    if best.is_main:
        print(
            f"best dev spearman {best.dev.spearman:.2f}, pearson {best.dev.pearson:.2f} "
            f"(epoch {best.epoch}); saved to {args.out}"
        )


def finetune_sft(args: Namespace) -> None:
    """instruction tuning on Alpaca JSON/JSONL, chat JSONL or Q/A CSV"""
    from sllm.finetune.sft import finetune_sft, sft_config

    result = finetune_sft(args.run, args.data, args.out, sft_config(args.overrides))
    held_out = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    if result.is_main:
        print(f"step {result.step}: held-out loss {held_out}; saved to {args.out}")


def export(args: Namespace) -> None:
    """write a run as a Hugging Face model directory or a GGUF file"""
    from sllm.export import check_export, export_run

    if args.format == "gguf":
        return _export_gguf(args)
    if args.dtype is not None:
        raise UserError("--dtype applies to --format gguf only; the hf export is float32")
    out = export_run(args.run, args.out, args.checkpoint)
    print(f"exported {args.run} to {out}")
    if args.check:
        difference = check_export(args.run, out, args.checkpoint)
        print(f"checked with transformers: largest logit difference {difference:.2e}")


def _export_gguf(args: Namespace) -> None:
    from sllm.export_gguf import check_gguf, export_gguf

    out = export_gguf(args.run, args.out, args.checkpoint, args.dtype or "f16")
    print(f"exported {args.run} to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if args.check:
        parity = check_gguf(args.run, out, args.checkpoint)
        print(
            f"checked with llama.cpp: same prompt tokens {parity.same_prompt_tokens}, largest logit "
            f"difference {parity.max_logit_difference:.2e}, greedy tokens equal "
            f"{parity.greedy_tokens_equal}/{parity.greedy_tokens}"
        )


def import_hf(args: Namespace) -> None:
    """make a run from a Hugging Face GPT-2 model directory"""
    from sllm.export import import_hf

    out = import_hf(args.hf, args.out)
    print(f"imported {args.hf} into {out}; generate with `sllm generate --run {out}`, or continue training:")
    print(f"  sllm prepare --config {out}/config.yaml --input TEXT && sllm train --config {out}/config.yaml")
