"""STS fine-tuning: a regression head on mean-pooled GPT states, scored by Spearman.

Both sentences go through the causal backbone in one right-padded batch (padding is kept out
of the mean); the head sees the SBERT features `[u, v, |u − v|, u * v]` and outputs
5·sigmoid(·). `sts.freeze=true` trains the head alone on sentence vectors pooled once;
otherwise the backbone trains too, at `sts.backbone_lr`. The one trainer runs it
(`PairRegression`); `best/` keeps the epoch with the highest dev Spearman.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from sllm.config import Config, build_dataclass, dataclass_from_overrides, option
from sllm.errors import UserError
from sllm.files import read_yaml
from sllm.finetune.metrics import StsScores, sts_scores
from sllm.finetune.options import (
    FinetuneOptions,
    check_options,
    keep_settings,
    main_process_log,
    trainer_config,
    write_settings,
)
from sllm.finetune.sts_data import MAX_SCORE, StsPair, load_sts
from sllm.model import build_model
from sllm.options import FRACTION, NON_NEGATIVE, POSITIVE
from sllm.run import BEST, CHECKPOINTS, STS_CONFIG_FILE, load_checkpoint, open_run, read_run_config
from sllm.runtime import Dtype, autocast, select_device
from sllm.tokenizer import Tokenizer, load_tokenizer
from sllm.train.objectives import Evaluation, PairRegression
from sllm.train.optim import decay_groups
from sllm.train.trainer import run_objective

SECTION = "sts"


@dataclass
class StsConfig(FinetuneOptions):
    epochs: int = option(4, "passes over the training pairs", POSITIVE)
    batch_size: int = option(32, "sentence pairs per optimizer step, all processes together", POSITIVE)
    lr: float = option(1e-3, "peak learning rate of the regression head", POSITIVE)
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)", NON_NEGATIVE)
    warmup_ratio: float = option(0.1, "share of the steps spent warming the learning rate up", FRACTION)
    seed: int = option(1234, "seed of the head's init, the shuffling and dropout")
    backbone_lr: float = option(1e-4, "peak learning rate of the backbone when it is not frozen", POSITIVE)
    freeze: bool = option(False, "keep the backbone fixed and train the head only")
    random_init: bool = option(False, "replace the pre-trained weights by a random init (a baseline)")
    max_length: int = option(64, "tokens kept per sentence; longer sentences are cut", POSITIVE)
    head_hidden: int = option(256, "hidden width of the regression head", POSITIVE)
    head_dropout: float = option(0.1, "dropout in the regression head during training", FRACTION)


def sts_config(overrides: list[str]) -> StsConfig:
    """StsConfig from `sts.key=value` overrides, type- and range-checked."""
    return dataclass_from_overrides(StsConfig, SECTION, overrides)


# ---- the model ------------------------------------------------------------------------


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each row: (B, T, C) and (B, T) → (B, C)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class SimilarityHead(nn.Module):
    """[u, v, |u − v|, u * v] → MLP → a score in [0, 5]."""

    def __init__(self, n_embd: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(4 * n_embd, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        return MAX_SCORE * torch.sigmoid(self.mlp(features).squeeze(-1))


class StsModel(nn.Module):
    """A backbone with `hidden_states(ids)` and the similarity head on its pooled states."""

    def __init__(self, backbone: nn.Module, head: SimilarityHead, freeze: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.freeze = backbone, head, freeze
        backbone.requires_grad_(not freeze)

    def train(self, mode: bool = True) -> StsModel:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def pool(self, *pairs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(u, v) from (first ids, first mask, second ids, second mask), both in one batch."""
        first, first_mask, second, second_mask = pairs
        ids, mask = torch.cat([first, second]), torch.cat([first_mask, second_mask])
        return masked_mean(self.backbone.hidden_states(ids), mask).chunk(2)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Scores from the pairs' ids and masks, or from sentence vectors (u, v) pooled before."""
        u, v = inputs if len(inputs) == 2 else self.pool(*inputs)
        return self.head(u, v)


def build_sts_model(backbone: nn.Module, cfg: StsConfig) -> StsModel:
    if not hasattr(backbone, "hidden_states"):
        raise UserError("the base run's model has no hidden states to pool (model.arch ffn); use a GPT run")
    head = SimilarityHead(backbone.cfg.n_embd, cfg.head_hidden, cfg.head_dropout)
    return StsModel(backbone, head, cfg.freeze)


# ---- data -----------------------------------------------------------------------------

Rows = tuple[torch.Tensor, ...]  # (first ids, first mask, second ids, second mask, gold) or (u, v, gold)


@dataclass
class EncodedPairs:
    """Token ids of both sentences and the gold scores."""

    first: list[list[int]]
    second: list[list[int]]
    scores: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.first)

    def tensors(self) -> Rows:
        """Both sentences right-padded to one width, with their masks and the gold scores."""
        ids, mask = pad_batch(self.first + self.second, self.pad_id)
        n = len(self)
        return ids[:n], mask[:n], ids[n:], mask[n:], self.scores


def encode_pairs(tokenizer: Tokenizer, pairs: list[StsPair], max_length: int) -> EncodedPairs:
    """Token ids cut to `max_length`; an empty sentence becomes the EOS token, so none is empty."""

    def encode(texts: list[str]) -> list[list[int]]:
        return [ids[:max_length] or [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]

    first, second = encode([p.sentence1 for p in pairs]), encode([p.sentence2 for p in pairs])
    return EncodedPairs(first, second, torch.tensor([p.score for p in pairs]), tokenizer.pad_id)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real tokens."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in sequences], True, pad_id)
    mask = pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in sequences], batch_first=True)
    return ids, mask


def _chunks(rows: Rows, device: torch.device, batch_size: int):
    for start in range(0, len(rows[0]), batch_size):
        yield tuple(t[start : start + batch_size].to(device) for t in rows)


@torch.no_grad()
def pool_pairs(model: StsModel, rows: Rows, device: torch.device, batch_size: int = 64) -> Rows:
    """Both sentences of every pair through the backbone once, in eval mode: (u, v, gold)."""
    model.eval()
    pooled = [model.pool(*pairs) for *pairs, _ in _chunks(rows, device, batch_size)]
    return torch.cat([u for u, _ in pooled]).cpu(), torch.cat([v for _, v in pooled]).cpu(), rows[-1]


@torch.no_grad()
def predict(
    model: StsModel, rows: Rows, device: torch.device, batch_size: int = 64, dtype: Dtype = None
) -> torch.Tensor:
    """Scores of every pair, from token rows or pooled ones."""
    model.eval()
    outputs = []
    for *inputs, _ in _chunks(rows, device, batch_size):
        with autocast(device, dtype):
            outputs.append(model(*inputs).float().cpu())
    return torch.cat(outputs)


def score(model: StsModel, data: EncodedPairs, device: torch.device) -> StsScores:
    return sts_scores(predict(model, data.tensors(), device).tolist(), data.scores.tolist())


# ---- training -------------------------------------------------------------------------


def build_optimizer(model: StsModel, cfg: StsConfig) -> torch.optim.AdamW:
    """Head and backbone in separate groups (own learning rates); no decay on biases and norms."""
    groups = []
    parts = [(model.head, cfg.lr)] + ([] if model.freeze else [(model.backbone, cfg.backbone_lr)])
    for module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{**group, "lr": lr} for group in decay_groups(params, cfg.weight_decay)]
    return torch.optim.AdamW(groups)


@dataclass
class StsResult:
    epoch: int  # of the best dev Spearman
    step: int
    dev: StsScores
    is_main: bool  # this process is rank 0 (the one that reports)


def fit(
    model: StsModel,
    train: EncodedPairs,
    dev: EncodedPairs,
    cfg: StsConfig,
    out_dir: Path,
    base: Config,
    tokenizer: Tokenizer,
    run_files: Callable[[Path], None] = lambda run_dir: None,
    log: Callable[[str], None] = print,
) -> StsResult:
    """Train (or resume) for `cfg.epochs` into `out_dir`, scoring `dev` each epoch; the best epoch."""
    train_rows, dev_rows = train.tensors(), dev.tensors()
    pooled_dev: list[Rows] = []

    def prepare(model: StsModel, device: torch.device) -> Rows:
        if not model.freeze:
            return train_rows
        pooled_dev.append(pool_pairs(model, dev_rows, device))
        return pool_pairs(model, train_rows, device)

    def evaluate(model: StsModel, device: torch.device, dtype: Dtype, batch_size: int) -> Evaluation:
        rows = pooled_dev[0] if pooled_dev else dev_rows
        predicted, gold = predict(model, rows, device, batch_size, dtype), rows[-1]
        scores = sts_scores(predicted.tolist(), gold.tolist())
        mse = float(F.mse_loss(predicted, gold))
        summary = f"dev spearman {scores.spearman:.2f}, pearson {scores.pearson:.2f}, mse {mse:.3f}"
        return Evaluation({**asdict(scores), "dev_mse": mse}, mse, -scores.spearman, summary)

    def write_run_files(run_dir: Path) -> None:
        tokenizer.save(run_dir)
        run_files(run_dir)

    objective = PairRegression(
        model=model, model_config=base.model, tokenizer=tokenizer, train_rows=train_rows,
        tokens_per_sample=2 * train_rows[0].shape[1], run_files=write_run_files, evaluation=evaluate,
        prepare=prepare, optimizer=lambda model: build_optimizer(model, cfg),
    )  # fmt: skip
    config = trainer_config(base, base.model, out_dir, cfg, len(train), samples=False)
    result = run_objective(config, objective, log)
    if not (out_dir / CHECKPOINTS / BEST).is_dir():
        if result.stopped_by:
            raise UserError(
                f"{result.stopped_by} received before the first epoch was scored; step {result.step} "
                "is saved: run the same command to resume"
            )
        raise UserError(
            "no epoch gave a dev Spearman (the predictions were constant); lower sts.lr or train longer"
        )
    meta = load_checkpoint(out_dir / CHECKPOINTS / BEST).meta
    scores = meta.val_metrics
    dev = StsScores(scores["spearman"], scores["pearson"], int(scores["n"]))
    epoch = math.ceil(meta.step / math.ceil(len(train) / cfg.batch_size))
    return StsResult(epoch, meta.step, dev, result.is_main)


# ---- runs -----------------------------------------------------------------------------


def finetune_sts(
    base_run: str | Path,
    train_path: str | Path,
    dev_path: str | Path,
    out_dir: str | Path,
    cfg: StsConfig,
    log: Callable[[str], None] = print,
) -> StsResult:
    """Fine-tune the base run on STS pairs (or resume that run); keep the best dev epoch."""
    check_options(cfg, SECTION)
    out_dir = Path(out_dir)
    paths = {"base_run": str(base_run), "train": str(train_path), "dev": str(dev_path)}
    settings = {SECTION: asdict(cfg), **paths}
    keep_settings(out_dir, STS_CONFIG_FILE, settings, SECTION)
    log = main_process_log(log)
    train_data, dev_data = load_sts(train_path), load_sts(dev_path)
    log(f"{train_data.summary()}\n{dev_data.summary()}")
    base = open_run(base_run, torch.device("cpu"), cfg.checkpoint)
    if cfg.max_length > base.model.block_size:
        raise UserError(
            f"sts.max_length ({cfg.max_length}) exceeds the backbone's context ({base.model.block_size})"
        )
    torch.manual_seed(cfg.seed)
    backbone = build_model(base.config.model) if cfg.random_init else base.model
    model = build_sts_model(backbone, cfg)
    train = encode_pairs(base.tokenizer, train_data.pairs, cfg.max_length)
    dev = encode_pairs(base.tokenizer, dev_data.pairs, cfg.max_length)
    return fit(
        model, train, dev, cfg, out_dir, base.config, base.tokenizer,
        run_files=lambda run_dir: write_settings(run_dir, STS_CONFIG_FILE, settings), log=log,
    )  # fmt: skip


def evaluate_sts(run_dir: str | Path, data_path: str | Path, device: str = "auto") -> tuple[StsScores, str]:
    """Spearman and Pearson (×100) of an STS run's `best/` on an STS file, and its summary."""
    data = load_sts(data_path)
    run_dir, chosen = Path(run_dir), select_device(device)
    settings = run_dir / STS_CONFIG_FILE
    if not settings.is_file():
        raise UserError(
            f"{run_dir} is not an STS run (no {STS_CONFIG_FILE}); make one with `sllm finetune sts`"
        )
    recorded = read_yaml(settings, "restore it from the run's fine-tuning")
    if not isinstance(recorded, dict) or not isinstance(recorded.get(SECTION), dict):
        raise UserError(
            f"{settings} is damaged (no {SECTION} section); restore it from the run's fine-tuning"
        )
    cfg = build_dataclass(StsConfig, SECTION, recorded[SECTION])
    model = build_sts_model(build_model(read_run_config(run_dir).model), cfg)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINTS / BEST).weights_for(model))
    encoded = encode_pairs(load_tokenizer(run_dir), data.pairs, cfg.max_length)
    return score(model.to(chosen), encoded, chosen), data.summary()
