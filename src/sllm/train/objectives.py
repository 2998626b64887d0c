"""What differs between pre-training, SFT and STS: the batches, the loss and the evaluation.

An objective supplies the model, a batch source whose `batch(step, index)` is a pure function
of (seed, step, micro-batch index), so resume replays the uninterrupted run and N processes
read what one process accumulating N micro-batches reads, the loss of one micro-batch, and an
evaluation whose `rank` (lower is better) decides `best/`. The trainer does everything else.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sllm.config import Config, ModelConfig, TrainConfig
from sllm.data.loader import TrainWindows, fixed_windows
from sllm.data.meta import DataMeta
from sllm.data.mixture import TrainMixture
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.evaluate import score_batches, script_labels
from sllm.model import build_model, count_parameters, describe
from sllm.model.stats import MemoryEstimate, training_memory
from sllm.runtime import Dtype, autocast
from sllm.sampling import SamplingParams
from sllm.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from sllm.train.optim import build_optimizers
from sllm.train.samples import opening_prompts, sample_prompts

Batch = tuple[torch.Tensor, ...]
Samples = list[tuple[str, str]]


class BatchSource(Protocol):
    def batch(self, step: int, index: int) -> Batch: ...


@dataclass
class Evaluation:
    metrics: dict[str, float]  # logged as they are
    val_loss: float | None  # recorded in the checkpoint's meta
    rank: float | None  # lower is better: `best/` keeps the evaluation with the lowest
    summary: str | None = None  # a line for the log (pre-training's evaluations go to the bar)


class Objective:
    """The interface; subclasses override what their task needs."""

    name: str
    model_config: ModelConfig  # the model section as trained (e.g. the data's vocabulary)
    tokenizer: Tokenizer
    tokens_per_sample: int  # tokens one sample (window, row, pair) counts for

    def tokens_per_epoch(self, batch_size: int) -> int: ...

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (called under the run's seed)."""

    def start(self, model: nn.Module, device: torch.device) -> None:
        """Work once the model sits on its device, before the first step."""

    def describe(self, model: nn.Module) -> str:
        """One line for the log: the model and its size."""
        return describe(model)

    def optimizers(
        self, model: nn.Module, t: TrainConfig, device: torch.device
    ) -> list[torch.optim.Optimizer]:
        return build_optimizers(model, t, device)

    def batches(self, micro_batch: int, batch_size: int, seed: int) -> BatchSource: ...

    def loss(self, model: nn.Module, batch: Batch, device: torch.device, dtype: Dtype) -> torch.Tensor: ...

    def evaluate(
        self, model: nn.Module, device: torch.device, dtype: Dtype, batch_size: int
    ) -> Evaluation | None:
        return None

    def samples(self, model: nn.Module, device: torch.device, dtype: Dtype) -> Samples:
        return []

    def memory(self, model: nn.Module, micro_batch: int) -> MemoryEstimate | None:
        """Estimated training memory of one micro-batch, if known (caps the CPU batch search)."""
        return None

    def write_run_files(self, run_dir: Path) -> None:
        """Files the run directory needs besides config, plan and checkpoints (rank 0 only)."""


# ---- pre-training ---------------------------------------------------------------------


def _resolved_model(cfg: Config, meta: DataMeta) -> ModelConfig:
    if cfg.model.vocab_size == 0:
        return replace(cfg.model, vocab_size=meta.vocab_size)
    if cfg.model.vocab_size < meta.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
            f"({meta.vocab_size}); set it to 0 to take the data's"
        )
    return cfg.model


class LanguageModeling(Objective):
    """Next-token prediction on random windows of a prepared data directory."""

    name = "lm"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.data.dir)
        meta = DataMeta.read(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        meta.check_tokenizer(self.data_dir, self.tokenizer.sha256, self.tokenizer.vocab_size)
        self.model_config = _resolved_model(cfg, meta)
        self.tokens_per_sample = cfg.train.block_size or cfg.model.block_size
        self.train_tokens = open_split(self.data_dir, "train", meta)
        self.mixture = TrainMixture.from_meta(meta)
        val_tokens = open_split(self.data_dir, "val", meta)
        self.val_windows = (
            fixed_windows(val_tokens, self.tokens_per_sample, cfg.train.eval_windows)
            if len(val_tokens) > 1
            else None
        )
        if self.val_windows is not None:  # each target's script group, for bits per byte by script
            labelled = [script_labels(row, self.tokenizer) for row in self.val_windows[1].numpy()]
            self.val_labels = torch.stack([torch.from_numpy(labels) for labels, _ in labelled])
            self.val_script_bytes = sum(script_bytes for _, script_bytes in labelled)
        held_out = val_tokens if len(val_tokens) > 1 else self.train_tokens
        self.sample_prompts = cfg.sample.prompts or opening_prompts(held_out, self.tokenizer)

    def tokens_per_epoch(self, batch_size: int) -> int:
        return len(self.train_tokens)

    def build_model(self) -> nn.Module:
        model = build_model(self.model_config)
        model.checkpoint_blocks = self.cfg.train.activation_checkpointing
        return model

    def batches(self, micro_batch: int, batch_size: int, seed: int) -> BatchSource:
        return TrainWindows(self.train_tokens, self.tokens_per_sample, micro_batch, seed, self.mixture)

    def loss(self, model: nn.Module, batch: Batch, device: torch.device, dtype: Dtype) -> torch.Tensor:
        """Next-token cross-entropy in fp32 (`train.chunked_loss`: inside the forward, one call for DDP)."""
        x, y = batch
        with autocast(device, dtype):
            if self.cfg.train.chunked_loss:
                return model(x, targets=y)
            logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def evaluate(
        self, model: nn.Module, device: torch.device, dtype: Dtype, batch_size: int
    ) -> Evaluation | None:
        if self.val_windows is None:
            return None
        batches = zip(*(windows.split(batch_size) for windows in self.val_windows), strict=True)
        scores = score_batches(model, batches, device, dtype, self.val_labels.flatten().numpy())
        metrics = {
            "val_loss": scores.loss,
            "val_perplexity": math.exp(scores.loss),
            "val_accuracy": scores.accuracy,
            "val_top5_accuracy": scores.top5_accuracy,
            "val_bits_per_byte": scores.nll / math.log(2) / max(int(self.val_script_bytes.sum()), 1),
            **{
                f"val_bits_per_byte_{g}": v
                for g, v in scores.script_bits_per_byte(self.val_script_bytes).items()
            },
        }
        return Evaluation(metrics, scores.loss, scores.loss)

    def samples(self, model: nn.Module, device: torch.device, dtype: Dtype) -> Samples:
        if not self.sample_prompts:
            return []
        params = SamplingParams.from_config(self.cfg.sample)
        return sample_prompts(model, self.tokenizer, self.sample_prompts, params, device, dtype)

    def memory(self, model: nn.Module, micro_batch: int) -> MemoryEstimate | None:
        checkpointing = self.cfg.train.activation_checkpointing
        return training_memory(model, self.model_config, micro_batch, self.tokens_per_sample, checkpointing)

    def write_run_files(self, run_dir: Path) -> None:
        """A copy of the tokenizer, so the run directory alone can generate."""
        if (run_dir / TOKENIZER_FILE).is_file() and load_tokenizer(run_dir).sha256 != self.tokenizer.sha256:
            raise UserError(
                f"{run_dir} was trained with another tokenizer than {self.data_dir}; use a new --out"
            )
        shutil.copyfile(self.data_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)


# ---- finite datasets ------------------------------------------------------------------


class EpochRows:
    """Row batches by (step, micro-batch index): epoch e reads the rows permuted by (seed, e) in whole
    steps, the last topped up from the permutation's start."""

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], micro_batch: int, batch_size: int, seed: int
    ) -> None:
        self.tensors, self.count = tensors, len(tensors[0])
        self.micro_batch, self.batch_size, self.seed = micro_batch, batch_size, seed
        self.steps_per_epoch = math.ceil(self.count / batch_size)
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.count, generator=generator)}
        return self._orders[epoch]

    def batch(self, step: int, index: int) -> Batch:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        first = step_in_epoch * self.batch_size + index * self.micro_batch
        chosen = self._order(epoch)[torch.arange(first, first + self.micro_batch) % self.count]
        return tuple(tensor[chosen] for tensor in self.tensors)


@dataclass(kw_only=True)
class RowsObjective(Objective):
    """A task on a finite dataset of row tensors, around a model its caller built or loaded."""

    model: nn.Module
    model_config: ModelConfig
    tokenizer: Tokenizer
    train_rows: tuple[torch.Tensor, ...]
    tokens_per_sample: int
    run_files: Callable[[Path], None] = lambda run_dir: None

    def tokens_per_epoch(self, batch_size: int) -> int:
        """Every row once, in whole steps."""
        return math.ceil(len(self.train_rows[0]) / batch_size) * batch_size * self.tokens_per_sample

    def build_model(self) -> nn.Module:
        return self.model

    def batches(self, micro_batch: int, batch_size: int, seed: int) -> BatchSource:
        return EpochRows(self.train_rows, micro_batch, batch_size, seed)

    def write_run_files(self, run_dir: Path) -> None:
        self.run_files(run_dir)


@dataclass(kw_only=True)
class MaskedRows(RowsObjective):
    """Packed rows (inputs, targets, weights, documents) for SFT; held-out rows give the val loss."""

    val_rows: tuple[torch.Tensor, ...]
    sample: Callable[[nn.Module, torch.device, Dtype], Samples] = lambda m, d, t: []
    name: str = "sft"

    def loss(self, model: nn.Module, batch: Batch, device: torch.device, dtype: Dtype) -> torch.Tensor:
        """Cross-entropy averaged over the weighted targets (the assistant's tokens)."""
        inputs, targets, weights, documents = batch
        with autocast(device, dtype):
            logits = model(inputs, document_ids=documents)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1.0)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, device: torch.device, dtype: Dtype, batch_size: int
    ) -> Evaluation | None:
        """Mean loss over the held-out targets; none when there are none (not a perfect 0)."""
        total, count = 0.0, 0.0
        for start in range(0, len(self.val_rows[0]), batch_size):
            batch = tuple(t[start : start + batch_size].to(device) for t in self.val_rows)
            weight = float(batch[2].sum())
            total += float(self.loss(model, batch, device, dtype)) * weight
            count += weight
        if not count:
            return None
        loss = total / count
        return Evaluation({"val_loss": loss}, loss, loss, f"held-out loss {loss:.4f}")

    def samples(self, model: nn.Module, device: torch.device, dtype: Dtype) -> Samples:
        return self.sample(model, device, dtype)

    def memory(self, model: nn.Module, micro_batch: int) -> MemoryEstimate | None:
        return training_memory(model, self.model_config, micro_batch, self.tokens_per_sample, False)


@dataclass(kw_only=True)
class PairRegression(RowsObjective):
    """Mean squared error of `model(*inputs)` against gold; `prepare(model, device)` gives the rows
    (a frozen backbone pools every sentence once)."""

    evaluation: Callable[[nn.Module, torch.device, Dtype, int], Evaluation | None]
    prepare: Callable[[nn.Module, torch.device], tuple[torch.Tensor, ...]]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    name: str = "sts"

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.train_rows = self.prepare(model, device)

    def optimizers(
        self, model: nn.Module, t: TrainConfig, device: torch.device
    ) -> list[torch.optim.Optimizer]:
        return [self.optimizer(model)]

    def loss(self, model: nn.Module, batch: Batch, device: torch.device, dtype: Dtype) -> torch.Tensor:
        *inputs, gold = batch
        with autocast(device, dtype):
            predicted = model(*inputs)
        return F.mse_loss(predicted.float(), gold.float())

    def evaluate(
        self, model: nn.Module, device: torch.device, dtype: Dtype, batch_size: int
    ) -> Evaluation | None:
        return self.evaluation(model, device, dtype, batch_size)

    def describe(self, model: nn.Module) -> str:
        return f"{type(model).__name__}: {count_parameters(model) / 1e6:.2f}M parameters"
