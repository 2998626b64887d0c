"""STS fine-tuning: a regression head on mean-pooled GPT states, scored by Spearman.

Both sentences of a pair go through the backbone in one batch, right-padded with the
tokenizer's pad id. The model is causal, so real tokens never attend to the padding after
them; the padding is only kept out of the mean (a masked mean of the final-norm hidden
states). The head sees `[u, v, |u − v|, u * v]` (the SBERT features) and outputs
5·sigmoid(·), so every prediction lies in [0, 5]; the loss is MSE against the gold score.

`sts.freeze=true` trains the head alone: the backbone (in eval mode, no dropout) pools
every sentence once, and the epochs run on those cached vectors, which makes a frozen run
about as cheap as one pass over the data. Otherwise the backbone trains too, at its own
lower `sts.backbone_lr`. Both follow a linear
warmup then linear decay to zero; gradients are clipped to norm 1. Training runs in fp32:
these models are small, and it spares a gradient scaler.

The output directory holds the base run's config.yaml (the backbone's shape), sts.yaml
(these settings and the data files), tokenizer.json, metrics.jsonl (one line per epoch)
and `checkpoints/best/`, the epoch with the highest dev Spearman, written atomically by
the same code as pre-training checkpoints. Its model.safetensors holds the backbone under
`backbone.` and the head under `head.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sllm.config import build_dataclass, dataclass_from_overrides, option, save_config
from sllm.errors import UserError
from sllm.finetune.metrics import StsScores, sts_scores
from sllm.finetune.schedule import warmup_linear_decay
from sllm.finetune.sts_data import MAX_SCORE, StsPair, load_sts
from sllm.model import build_model
from sllm.runs import CONFIG_FILE, STS_CONFIG_FILE, LoadedRun, open_run, read_run_config
from sllm.runtime import select_device
from sllm.tokenizer import Tokenizer, load_tokenizer
from sllm.train.checkpoint import BEST, CHECKPOINTS, load_checkpoint, write_checkpoint
from sllm.train.monitor import JsonlSink

SECTION = "sts"
GRAD_CLIP = 1.0


@dataclass
class StsConfig:
    epochs: int = option(4, "passes over the training pairs")
    batch_size: int = option(32, "sentence pairs per optimizer step")
    lr: float = option(1e-3, "peak learning rate of the regression head")
    backbone_lr: float = option(1e-4, "peak learning rate of the backbone when it is not frozen")
    freeze: bool = option(False, "keep the backbone fixed and train the head only")
    random_init: bool = option(False, "replace the pre-trained weights by a random init (a baseline)")
    max_length: int = option(64, "tokens kept per sentence; longer sentences are cut")
    head_hidden: int = option(256, "hidden width of the regression head")
    head_dropout: float = option(0.1, "dropout in the regression head during training")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    warmup_ratio: float = option(0.1, "share of the steps spent warming the learning rate up")
    seed: int = option(1234, "seed of the head's init, the shuffling and dropout")
    checkpoint: Literal["latest", "best"] = option("latest", "checkpoint of the base run to start from")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to train")


def sts_config(overrides: list[str]) -> StsConfig:
    """StsConfig from `sts.key=value` overrides, validated."""
    cfg = dataclass_from_overrides(StsConfig, SECTION, overrides)
    validate_sts_config(cfg)
    return cfg


def validate_sts_config(cfg: StsConfig) -> None:
    for key in ("epochs", "batch_size", "lr", "backbone_lr", "max_length", "head_hidden"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key {SECTION}.{key} must be positive, got {getattr(cfg, key)}")
    for key in ("head_dropout", "warmup_ratio"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"config key {SECTION}.{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.weight_decay < 0:
        raise UserError(f"config key {SECTION}.weight_decay must be >= 0, got {cfg.weight_decay}")


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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`ids` holds the first sentences then the second ones (2B rows); returns B scores."""
        u, v = self.embed(ids, mask).chunk(2)
        return self.head(u, v)


def build_sts_model(backbone: nn.Module, cfg: StsConfig) -> StsModel:
    if not hasattr(backbone, "hidden_states"):
        raise UserError("the base run's model has no hidden states to pool (model.arch ffn); use a GPT run")
    head = SimilarityHead(backbone.cfg.n_embd, cfg.head_hidden, cfg.head_dropout)
    return StsModel(backbone, head, cfg.freeze)


# ---- data -----------------------------------------------------------------------------


@dataclass
class EncodedPairs:
    """Token ids of both sentences; batches are (ids, mask, gold) for `StsModel`."""

    first: list[list[int]]
    second: list[list[int]]
    scores: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.first)

    def batches(self, order: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The first sentences stacked over the second ones, right-padded, with the gold scores."""
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            sentences = [self.first[i] for i in chosen] + [self.second[i] for i in chosen]
            yield *pad_batch(sentences, self.pad_id), self.scores[chosen]


@dataclass
class PooledPairs:
    """Sentence vectors of a frozen backbone; batches are (u, v, gold) for `SimilarityHead`."""

    first: torch.Tensor
    second: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.first)

    def batches(self, order: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield self.first[chosen], self.second[chosen], self.scores[chosen]


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


@torch.no_grad()
def pool_pairs(
    model: StsModel, data: EncodedPairs, device: torch.device, batch_size: int = 64
) -> PooledPairs:
    """Both sentences of every pair through the backbone once, in eval mode."""
    model.eval()
    pooled = [model.embed(ids.to(device), mask.to(device)).cpu().chunk(2) for ids, mask, _ in
              data.batches(list(range(len(data))), batch_size)]  # fmt: skip
    return PooledPairs(torch.cat([u for u, _ in pooled]), torch.cat([v for _, v in pooled]), data.scores)


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


Pairs = EncodedPairs | PooledPairs


@torch.no_grad()
def predict(scorer: nn.Module, data: Pairs, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Scores of every pair: `scorer` is the `StsModel` for token ids, its head for pooled pairs."""
    scorer.eval()
    order = list(range(len(data)))
    outputs = [scorer(a.to(device), b.to(device)).cpu() for a, b, _ in data.batches(order, batch_size)]
    return torch.cat(outputs)


def score(scorer: nn.Module, data: Pairs, device: torch.device) -> StsScores:
    return sts_scores(predict(scorer, data, device).tolist(), data.scores.tolist())


@dataclass
class EpochResult:
    epoch: int
    step: int
    train_mse: float
    dev: StsScores


def fit(
    model: StsModel,
    train: EncodedPairs,
    dev: EncodedPairs,
    cfg: StsConfig,
    device: torch.device,
    on_epoch: Callable[[EpochResult], None] = lambda _: None,
) -> list[EpochResult]:
    """Train for `cfg.epochs`, scoring `dev` after each epoch; returns every epoch's result."""
    if model.freeze:
        pooled_train, pooled_dev = pool_pairs(model, train, device), pool_pairs(model, dev, device)
        return _train_epochs(model, model.head, pooled_train, pooled_dev, cfg, device, on_epoch)
    return _train_epochs(model, model, train, dev, cfg, device, on_epoch)


def _train_epochs(
    model: StsModel,
    scorer: nn.Module,
    train: Pairs,
    dev: Pairs,
    cfg: StsConfig,
    device: torch.device,
    on_epoch: Callable[[EpochResult], None],
) -> list[EpochResult]:
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(cfg.epochs * steps_per_epoch, cfg.warmup_ratio)
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    results, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total_loss = 0.0
        for a, b, gold in train.batches(order, cfg.batch_size):
            loss = F.mse_loss(scorer(a.to(device), b.to(device)), gold.to(device))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total_loss += loss.item() * len(gold)
            step += 1
        result = EpochResult(epoch, step, total_loss / len(train), score(scorer, dev, device))
        results.append(result)
        on_epoch(result)
    return results


# ---- runs -----------------------------------------------------------------------------


def _refuse_finished(out_dir: Path) -> None:
    if (out_dir / CHECKPOINTS / BEST).exists():
        raise UserError(f"{out_dir} already holds a trained model (checkpoints/best); choose a new --out")


def _write_run_files(out_dir: Path, base: LoadedRun, cfg: StsConfig, files: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(base.config, out_dir / CONFIG_FILE)
    base.tokenizer.save(out_dir)
    payload = {SECTION: asdict(cfg), "base_run": str(base.path), **files}
    (out_dir / STS_CONFIG_FILE).write_text(
        yaml.safe_dump(payload, allow_unicode=True, sort_keys=False), "utf-8"
    )


def finetune_sts(
    base_run: str | Path,
    train_path: str | Path,
    dev_path: str | Path,
    out_dir: str | Path,
    cfg: StsConfig,
    log: Callable[[str], None] = print,
) -> EpochResult:
    """Fine-tune the base run on STS pairs; keep the epoch with the best dev Spearman."""
    validate_sts_config(cfg)
    out_dir = Path(out_dir)
    _refuse_finished(out_dir)
    train_data, dev_data = load_sts(train_path), load_sts(dev_path)
    log(train_data.summary())
    log(dev_data.summary())
    device = select_device(cfg.device)
    base = open_run(base_run, device, cfg.checkpoint)
    if cfg.max_length > base.model.block_size:
        raise UserError(
            f"sts.max_length ({cfg.max_length}) exceeds the backbone's context ({base.model.block_size})"
        )
    torch.manual_seed(cfg.seed)
    backbone = build_model(base.config.model).to(device) if cfg.random_init else base.model
    model = build_sts_model(backbone, cfg).to(device)
    tokenizer = base.tokenizer
    train = encode_pairs(tokenizer, train_data.pairs, cfg.max_length)
    dev = encode_pairs(tokenizer, dev_data.pairs, cfg.max_length)
    _write_run_files(out_dir, base, cfg, {"train": str(train_path), "dev": str(dev_path)})

    sinks = JsonlSink(out_dir, start_step=0)
    best: EpochResult | None = None

    def on_epoch(result: EpochResult) -> None:
        nonlocal best
        sinks.log(result.step, {"epoch": result.epoch, "train_mse": result.train_mse, **asdict(result.dev)})
        improved = best is None or result.dev.better_than(best.dev)
        if improved:
            best = result
            meta = {"step": result.step, "epoch": result.epoch, "dev": asdict(result.dev),
                    "tokenizer_sha256": tokenizer.sha256}  # fmt: skip
            write_checkpoint(out_dir / CHECKPOINTS / BEST, model.state_dict(), {"epoch": result.epoch}, meta)
        log(
            f"epoch {result.epoch}/{cfg.epochs}: train mse {result.train_mse:.3f}, dev spearman "
            f"{result.dev.spearman:.2f}, pearson {result.dev.pearson:.2f}" + (" (best)" if improved else "")
        )

    try:
        fit(model, train, dev, cfg, device, on_epoch)
    finally:
        sinks.close()
    assert best is not None
    return best


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
