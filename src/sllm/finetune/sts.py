"""STS fine-tuning: a regression head on mean-pooled GPT states, scored by Spearman.

Both sentences of a pair go through the backbone in one batch, right-padded with the
tokenizer's pad id. The model is causal, so real tokens never attend to the padding after
them; the padding is only kept out of the mean (a masked mean of the final-norm hidden
states). The head sees `[u, v, |u − v|, u * v]` (the SBERT features) and outputs
5·sigmoid(·), so every prediction lies in [0, 5]; the loss is MSE against the gold score.

`sts.freeze=true` trains the head alone: the backbone (in eval mode, no dropout) pools
every sentence once, and the epochs run on those cached vectors, which makes a frozen run
about as cheap as one pass over the data. Otherwise the backbone trains too, at its own
lower `sts.backbone_lr`. Training is the one trainer's (`sllm.train.trainer`) with the
`PairRegression` objective, so STS resumes, accumulates and runs under torchrun as
pre-training does; the dev set is scored after each epoch and `best/` keeps the epoch with
the highest Spearman.

The output directory holds config.yaml (the backbone's shape), sts.yaml (these settings and
the data files), tokenizer.json, metrics.jsonl and checkpoints, whose model.safetensors holds
the backbone under `backbone.` and the head under `head.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sllm.config import Config, build_dataclass, dataclass_from_overrides, option
from sllm.errors import UserError
from sllm.finetune.metrics import StsScores, sts_scores
from sllm.finetune.options import (
    FinetuneOptions,
    keep_settings,
    main_process_log,
    trainer_config,
    validate_options,
    write_settings,
)
from sllm.finetune.sts_data import MAX_SCORE, StsPair, load_sts
from sllm.model import build_model
from sllm.run import BEST, CHECKPOINTS, STS_CONFIG_FILE, load_checkpoint, open_run, read_run_config
from sllm.runtime import autocast, select_device
from sllm.tokenizer import Tokenizer, load_tokenizer
from sllm.train.objectives import Evaluation, PairRegression
from sllm.train.trainer import run_objective

SECTION = "sts"


@dataclass
class StsConfig(FinetuneOptions):
    epochs: int = option(4, "passes over the training pairs")
    batch_size: int = option(32, "sentence pairs per optimizer step, all processes together")
    lr: float = option(1e-3, "peak learning rate of the regression head")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    warmup_ratio: float = option(0.1, "share of the steps spent warming the learning rate up")
    seed: int = option(1234, "seed of the head's init, the shuffling and dropout")
    backbone_lr: float = option(1e-4, "peak learning rate of the backbone when it is not frozen")
    freeze: bool = option(False, "keep the backbone fixed and train the head only")
    random_init: bool = option(False, "replace the pre-trained weights by a random init (a baseline)")
    max_length: int = option(64, "tokens kept per sentence; longer sentences are cut")
    head_hidden: int = option(256, "hidden width of the regression head")
    head_dropout: float = option(0.1, "dropout in the regression head during training")


def sts_config(overrides: list[str]) -> StsConfig:
    """StsConfig from `sts.key=value` overrides, validated."""
    cfg = dataclass_from_overrides(StsConfig, SECTION, overrides)
    validate_sts_config(cfg)
    return cfg


def validate_sts_config(cfg: StsConfig) -> None:
    validate_options(cfg, SECTION)
    for key in ("backbone_lr", "max_length", "head_hidden"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key {SECTION}.{key} must be positive, got {getattr(cfg, key)}")
    if not 0 <= cfg.head_dropout < 1:
        raise UserError(f"config key {SECTION}.head_dropout must be in [0, 1), got {cfg.head_dropout}")


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
        self.backbone = backbone
        self.head = head
        self.freeze = freeze
        backbone.requires_grad_(not freeze)

    def train(self, mode: bool = True) -> StsModel:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.backbone.hidden_states(ids), mask)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """B scores from the pairs' token ids and masks (first ids, first mask, second ids,
        second mask), or from the sentence vectors (u, v) a frozen backbone pooled before."""
        if len(inputs) == 2:
            u, v = inputs
        else:
            first, first_mask, second, second_mask = inputs
            ids, mask = torch.cat([first, second]), torch.cat([first_mask, second_mask])
            u, v = self.embed(ids, mask).chunk(2)
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

    return EncodedPairs(
        encode([p.sentence1 for p in pairs]),
        encode([p.sentence2 for p in pairs]),
        torch.tensor([p.score for p in pairs], dtype=torch.float32),
        tokenizer.pad_id,
    )


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real tokens."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = True
    return ids, mask


def _chunks(rows: Rows, device: torch.device, batch_size: int):
    for start in range(0, len(rows[0]), batch_size):
        yield tuple(t[start : start + batch_size].to(device) for t in rows)


@torch.no_grad()
def pool_pairs(model: StsModel, rows: Rows, device: torch.device, batch_size: int = 64) -> Rows:
    """Both sentences of every pair through the backbone once, in eval mode: (u, v, gold)."""
    model.eval()
    pooled = []
    for first, first_mask, second, second_mask, _ in _chunks(rows, device, batch_size):
        ids, mask = torch.cat([first, second]), torch.cat([first_mask, second_mask])
        pooled.append(model.embed(ids, mask).cpu().chunk(2))
    return torch.cat([u for u, _ in pooled]), torch.cat([v for _, v in pooled]), rows[-1]


@torch.no_grad()
def predict(
    model: StsModel, rows: Rows, device: torch.device, batch_size: int = 64, dtype: torch.dtype | None = None
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
        groups.append(
            {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": cfg.weight_decay}
        )
        groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


@dataclass
class StsResult:
    epoch: int  # of the best dev Spearman
    step: int
    dev: StsScores


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
    """Train for `cfg.epochs` into the run directory `out_dir`, scoring `dev` after each epoch
    (or resume that run); returns the best epoch."""
    train_rows, dev_rows = train.tensors(), dev.tensors()
    pooled_dev: list[Rows] = []

    def prepare(model: StsModel, device: torch.device) -> Rows:
        if not model.freeze:
            return train_rows
        pooled_dev.append(pool_pairs(model, dev_rows, device))
        return pool_pairs(model, train_rows, device)

    def evaluate(
        model: StsModel, device: torch.device, dtype: torch.dtype | None, batch_size: int
    ) -> Evaluation:
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
    return _best(out_dir, math.ceil(len(train) / cfg.batch_size))


def _best(out_dir: Path, steps_per_epoch: int) -> StsResult:
    meta = load_checkpoint(out_dir / CHECKPOINTS / BEST).meta
    scores = meta.val_metrics
    dev = StsScores(scores["spearman"], scores["pearson"], int(scores["n"]))
    return StsResult(math.ceil(meta.step / steps_per_epoch), meta.step, dev)


# ---- runs -----------------------------------------------------------------------------


def finetune_sts(
    base_run: str | Path,
    train_path: str | Path,
    dev_path: str | Path,
    out_dir: str | Path,
    cfg: StsConfig,
    log: Callable[[str], None] = print,
) -> StsResult:
    """Fine-tune the base run on STS pairs; keep the epoch with the best dev Spearman. The same
    command again resumes an interrupted run."""
    validate_sts_config(cfg)
    out_dir = Path(out_dir)
    settings = {
        SECTION: asdict(cfg),
        "base_run": str(base_run),
        "train": str(train_path),
        "dev": str(dev_path),
    }
    keep_settings(out_dir, STS_CONFIG_FILE, settings, SECTION)
    log = main_process_log(log)
    train_data, dev_data = load_sts(train_path), load_sts(dev_path)
    log(train_data.summary())
    log(dev_data.summary())
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


@dataclass
class StsRun:
    model: StsModel
    tokenizer: Tokenizer
    config: StsConfig


def open_sts_run(run_dir: str | Path, device: torch.device) -> StsRun:
    """The fine-tuned model of an STS run directory, in eval mode, from `checkpoints/best`."""
    run_dir = Path(run_dir)
    settings = run_dir / STS_CONFIG_FILE
    if not settings.is_file():
        raise UserError(
            f"{run_dir} is not an STS run (no {STS_CONFIG_FILE}); make one with `sllm finetune sts`"
        )
    base_config = read_run_config(run_dir)
    cfg = build_dataclass(StsConfig, SECTION, yaml.safe_load(settings.read_text(encoding="utf-8"))[SECTION])
    model = build_sts_model(build_model(base_config.model), cfg)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINTS / BEST).model_state())
    return StsRun(model.to(device).eval(), load_tokenizer(run_dir), cfg)


def evaluate_sts(run_dir: str | Path, data_path: str | Path, device: str = "auto") -> tuple[StsScores, str]:
    """Spearman and Pearson (×100) of an STS run on any STS file, and the file's summary line."""
    data = load_sts(data_path)
    chosen = select_device(device)
    run = open_sts_run(run_dir, chosen)
    encoded = encode_pairs(run.tokenizer, data.pairs, run.config.max_length)
    return score(run.model, encoded, chosen), data.summary()
