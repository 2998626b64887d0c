"""Instruction tuning (SFT): next-token loss on the assistant's tokens of templated chats.

The base run's tokenizer gains the chat template's tokens (the model their embedding rows);
conversations are rendered, split by a seeded shuffle and packed into rows of the model's
context, then trained by the one trainer (`MaskedRows`). The output is an ordinary run
directory plus sft.yaml and chat_template.json; after each epoch `sft.prompts` are answered.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sllm.config import dataclass_from_overrides, option
from sllm.errors import UserError
from sllm.finetune.options import (
    FinetuneOptions,
    check_options,
    keep_settings,
    main_process_log,
    trainer_config,
    write_settings,
)
from sllm.finetune.packing import PackedRows, pack
from sllm.finetune.sft_data import Message, load_sft
from sllm.infer.chat_template import (
    END_TOKEN,
    SFT_TEMPLATE,
    grow_embeddings,
    render,
    render_prompt,
    save_chat_template,
    with_template_tokens,
)
from sllm.options import FRACTION, NON_NEGATIVE, POSITIVE
from sllm.run import SFT_CONFIG_FILE, open_run
from sllm.sampling import SamplingParams
from sllm.tokenizer import Tokenizer
from sllm.train.objectives import MaskedRows
from sllm.train.samples import sample_prompts
from sllm.train.trainer import TrainResult, run_objective

SECTION = "sft"


@dataclass
class SftConfig(FinetuneOptions):
    batch_size: int = option(8, "packed rows per optimizer step, all processes together", POSITIVE)
    val_ratio: float = option(0.05, "share of the examples held out for the validation loss", FRACTION)
    block_size: int = option(0, "packed row length; 0 means the model's context", NON_NEGATIVE)
    prompts: list[str] = option(
        ["대한민국의 수도는?", "오늘 기분이 어때?"], "questions answered after each epoch"
    )
    max_new_tokens: int = option(48, "longest answer to those questions (greedy decoding)", NON_NEGATIVE)


def sft_config(overrides: list[str]) -> SftConfig:
    """SftConfig from `sft.key=value` overrides, type- and range-checked."""
    return dataclass_from_overrides(SftConfig, SECTION, overrides)


def answer_prompts(
    model: nn.Module, tokenizer: Tokenizer, cfg: SftConfig, device: torch.device
) -> list[tuple[str, str]]:
    """(question, greedy answer) for each of `cfg.prompts`, ending at `<|end|>` or EOS."""
    return sample_prompts(
        model, tokenizer, cfg.prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0),
        device, encode=lambda prompt: render_prompt(tokenizer, [Message("user", prompt)]),
        stop_id=tokenizer.token_id(END_TOKEN),
    )  # fmt: skip


def pack_split(
    train_examples: list, val_examples: list, length: int, pad_id: int
) -> tuple[PackedRows, PackedRows]:
    """Both splits packed into rows; no row to train on is a UserError, not a loss of 0."""
    train_rows, val_rows = pack(train_examples, length, pad_id), pack(val_examples, length, pad_id)
    if not len(train_rows):
        raise UserError(
            f"none of the {len(train_examples):,} training examples has an assistant token to train on; "
            "give the examples non-empty assistant answers"
        )
    return train_rows, val_rows


def packing_summary(train_rows: PackedRows, val_rows: PackedRows, length: int) -> str:
    """One line: examples and rows per split, and how many were cut (and where) or skipped."""
    cut_prompt = train_rows.cut_prompt + val_rows.cut_prompt
    cut_answer = train_rows.cut_answer + val_rows.cut_answer
    return (
        f"{train_rows.examples:,} train / {val_rows.examples:,} held-out examples in "
        f"{len(train_rows):,} / {len(val_rows):,} rows of {length} tokens; "
        f"{cut_prompt + cut_answer:,} cut to fit ({cut_prompt:,} prompt side, {cut_answer:,} answer end), "
        f"{train_rows.skipped + val_rows.skipped:,} skipped with no answer token"
    )


def finetune_sft(
    base_run: str | Path, data_path: str | Path, out_dir: str | Path, cfg: SftConfig, log: Callable = print
) -> TrainResult:
    """Instruction-tune the base run on `data_path` into `out_dir` (or resume that run)."""
    check_options(cfg, SECTION)
    out_dir = Path(out_dir)
    settings = {SECTION: asdict(cfg), "base_run": str(base_run), "data": str(data_path)}
    keep_settings(out_dir, SFT_CONFIG_FILE, settings, SECTION)
    log = main_process_log(log)
    data = load_sft(data_path)
    log(data.summary())
    base = open_run(base_run, torch.device("cpu"), cfg.checkpoint)
    if not hasattr(base.model, "hidden_states"):
        raise UserError("SFT needs a GPT base run (model.arch gpt)")
    length = cfg.block_size or base.model.block_size
    if length > base.model.block_size:
        raise UserError(f"sft.block_size ({length}) exceeds the model's context ({base.model.block_size})")
    tokenizer = with_template_tokens(base.tokenizer)
    grow_embeddings(base.model, tokenizer.vocab_size)
    examples = [render(tokenizer, c) for c in data.conversations]
    random.Random(cfg.seed).shuffle(examples)
    held_out = min(len(examples) - 1, round(len(examples) * cfg.val_ratio))
    train_examples, val_examples = examples[held_out:], examples[:held_out]
    train_rows, val_rows = pack_split(train_examples, val_examples, length, tokenizer.pad_id)
    log(packing_summary(train_rows, val_rows, length))

    def write_run_files(run_dir: Path) -> None:
        tokenizer.save(run_dir)
        save_chat_template(run_dir, SFT_TEMPLATE)
        write_settings(run_dir, SFT_CONFIG_FILE, settings)

    objective = MaskedRows(
        model=base.model, model_config=replace(base.model.cfg), tokenizer=tokenizer,
        train_rows=train_rows.tensors(), tokens_per_sample=length, run_files=write_run_files,
        val_rows=val_rows.tensors(),
        sample=lambda model, device, dtype: answer_prompts(model, tokenizer, cfg, device),
    )  # fmt: skip
    config = trainer_config(
        base.config, objective.model_config, out_dir, cfg, len(train_rows), samples=bool(cfg.prompts)
    )
    return run_objective(config, objective, log)
