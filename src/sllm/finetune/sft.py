"""Instruction tuning (SFT): next-token loss on the assistant's tokens of templated chats.

The base run's tokenizer gains the chat template tokens when it lacks them (and the model
one embedding row per new token); conversations are rendered with `chat_template`, split
into train and held-out examples by a seeded shuffle, and packed into rows of the
model's context with document masks and position resets (`packing`); an example longer
than a row loses the start of its prompt, not its answer. The loss is the cross-entropy
averaged over the weighted (assistant) targets only; a run with none to train on stops
before training rather than report a loss of 0.

The output is an ordinary run directory — config.yaml (with the grown vocabulary),
tokenizer.json, `checkpoints/step-N` + LATEST after each epoch, `best/` by held-out loss,
metrics.jsonl — so `sllm generate` and `sllm eval` open it like any run. After each epoch
the fixed `sft.prompts` are answered greedily into `samples/`, each until `<|end|>` or
the end-of-text token, as `sllm generate` stops.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import takewhile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sllm.config import dataclass_from_overrides, option, save_config
from sllm.errors import UserError
from sllm.finetune.packing import PackedRows, pack
from sllm.finetune.schedule import warmup_linear_decay
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
from sllm.infer.engine import stream_tokens
from sllm.infer.sampling import SamplingParams
from sllm.runs import CONFIG_FILE, open_run
from sllm.runtime import select_device
from sllm.tokenizer import Tokenizer
from sllm.train.checkpoint import load_latest, save_best, save_checkpoint
from sllm.train.monitor import JsonlSink
from sllm.train.samples import write_samples

SECTION = "sft"
GRAD_CLIP = 1.0


@dataclass
class SftConfig:
    epochs: int = option(2, "passes over the training examples")
    batch_size: int = option(8, "packed rows per optimizer step")
    lr: float = option(3e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up")
    val_ratio: float = option(0.05, "share of the examples held out for the validation loss")
    block_size: int = option(0, "packed row length; 0 means the model's context")
    seed: int = option(1234, "seed of the split, the shuffling and dropout")
    checkpoint: Literal["latest", "best"] = option("latest", "checkpoint of the base run to start from")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to train")
    prompts: list[str] = option(
        ["대한민국의 수도는?", "오늘 기분이 어때?"], "questions answered after each epoch"
    )
    max_new_tokens: int = option(48, "longest answer to those questions (greedy decoding)")


def sft_config(overrides: list[str]) -> SftConfig:
    cfg = dataclass_from_overrides(SftConfig, SECTION, overrides)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key {SECTION}.{key} must be positive, got {getattr(cfg, key)}")
    if (
        not 0 <= cfg.val_ratio < 1
        or not 0 <= cfg.warmup_ratio < 1
        or cfg.block_size < 0
        or cfg.max_new_tokens < 0
    ):
        raise UserError(
            f"{SECTION}.val_ratio and {SECTION}.warmup_ratio must be in [0, 1), "
            f"{SECTION}.block_size and {SECTION}.max_new_tokens >= 0"
        )
    return cfg


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the weighted targets (the assistant's tokens)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1.0)


def _batch_loss(model: nn.Module, rows: PackedRows, chosen: list[int], device: torch.device) -> torch.Tensor:
    inputs, targets, weights, documents = (
        t[chosen].to(device) for t in (rows.inputs, rows.targets, rows.weights, rows.documents)
    )
    return masked_loss(model(inputs, document_ids=documents), targets, weights)


@torch.no_grad()
def answer_prompts(
    model: nn.Module, tokenizer: Tokenizer, cfg: SftConfig, device: torch.device
) -> list[tuple[str, str]]:
    """(question, greedy answer) for each of `cfg.prompts`, rendered with the chat template; an
    answer ends at `<|end|>` or EOS, whichever comes first."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    model.eval()
    answers = []
    end = tokenizer.token_id(END_TOKEN)
    for prompt in cfg.prompts:
        ids = render_prompt(tokenizer, [Message("user", prompt)])[-(model.block_size - 1) :]
        stream = stream_tokens(
            model, ids, params, tokenizer.eos_id, device, banned_ids=tokenizer.never_generated
        )
        new = list(takewhile(lambda token: token != end, stream))  # EOS ends the stream itself
        stream.close()
        answers.append((prompt, tokenizer.decode(new)))
    return answers


@torch.no_grad()
def validation_loss(
    model: nn.Module, rows: PackedRows, batch_size: int, device: torch.device
) -> float | None:
    """Mean loss over the held-out targets; None when there are none (not a perfect 0)."""
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        chosen = list(range(start, min(start + batch_size, len(rows))))
        weight = float(rows.weights[chosen].sum())
        total += float(_batch_loss(model, rows, chosen, device)) * weight
        count += weight
    return total / count if count else None


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


def _split(examples: list, val_ratio: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = min(len(examples) - 1, round(len(examples) * val_ratio))
    return [examples[i] for i in order[held_out:]], [examples[i] for i in order[:held_out]]


@dataclass
class SftResult:
    step: int
    val_loss: float | None


def finetune_sft(
    base_run: str | Path, data_path: str | Path, out_dir: str | Path, cfg: SftConfig, log: Callable = print
) -> SftResult:
    """Instruction-tune the base run on `data_path`; write a run directory at `out_dir`."""
    out_dir = Path(out_dir)
    if load_latest(out_dir) is not None:
        raise UserError(f"{out_dir} already holds checkpoints; choose a new --out")
    data = load_sft(data_path)
    log(data.summary())
    device = select_device(cfg.device)
    base = open_run(base_run, device, cfg.checkpoint)
    if not hasattr(base.model, "hidden_states"):
        raise UserError("SFT needs a GPT base run (model.arch gpt)")
    length = cfg.block_size or base.model.block_size
    if length > base.model.block_size:
        raise UserError(f"sft.block_size ({length}) exceeds the model's context ({base.model.block_size})")
    tokenizer = with_template_tokens(base.tokenizer)
    grow_embeddings(base.model, tokenizer.vocab_size)
    train_examples, val_examples = _split(
        [render(tokenizer, c) for c in data.conversations], cfg.val_ratio, cfg.seed
    )
    train_rows, val_rows = pack_split(train_examples, val_examples, length, tokenizer.pad_id)
    log(packing_summary(train_rows, val_rows, length))
    config = copy.deepcopy(base.config)
    config.model.vocab_size, config.train.out_dir = tokenizer.vocab_size, str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    tokenizer.save(out_dir)
    save_chat_template(out_dir, SFT_TEMPLATE)
    return _train(base.model, train_rows, val_rows, cfg, device, out_dir, tokenizer, log)


def _train(
    model: nn.Module,
    train_rows: PackedRows,
    val_rows: PackedRows,
    cfg: SftConfig,
    device: torch.device,
    out_dir: Path,
    tokenizer: Tokenizer,
    log: Callable,
) -> SftResult:
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    total_steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(total_steps, cfg.warmup_ratio)
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    sinks = JsonlSink(out_dir, start_step=0)
    step, tokens_seen, best, val_loss = 0, 0, math.inf, None
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = torch.randperm(len(train_rows), generator=generator).tolist()
            for start in range(0, len(order), cfg.batch_size):
                chosen = order[start : start + cfg.batch_size]
                loss = _batch_loss(model, train_rows, chosen, device)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += train_rows.inputs[chosen].numel()
            val_loss = validation_loss(model, val_rows, cfg.batch_size, device)
            sinks.log(step, {"epoch": epoch, "loss": loss.item(), "val_loss": val_loss})
            meta = {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss,
                    "model_config": asdict(model.cfg), "tokenizer_sha256": tokenizer.sha256}  # fmt: skip
            state = {"epoch": epoch, "step": step}
            save_checkpoint(out_dir, model.state_dict(), state, meta, keep_last=1)
            if val_loss is not None and val_loss < best:
                best = val_loss
                save_best(out_dir, model.state_dict(), state, meta)
            if cfg.prompts:
                write_samples(out_dir, step, answer_prompts(model, tokenizer, cfg, device))
            shown = "n/a" if val_loss is None else f"{val_loss:.4f}"
            log(f"epoch {epoch}/{cfg.epochs}: train loss {loss.item():.4f}, held-out loss {shown}")
    finally:
        sinks.close()
    return SftResult(step, val_loss)
