"""Optimizers and learning-rate schedules.

- `adamw`: weight decay on matrices only. Fused on CUDA and on the CPU, where it took a third
  of the foreach kernel's time (4.2 vs 13.0 ms a step at the 10m shape; docs/log.md).
- `adafactor`: factored second moments for memory-bound runs; its steps are `train.lr` times
  each weight's RMS, so it wants a larger lr (1e-2).
- `muon`: orthogonalized momentum for the 2-D weights inside the blocks, AdamW for the rest;
  its rate matches AdamW's update RMS, so one `train.lr` serves both.

Schedules: linear warmup, then cosine decay to `min_lr` or WSD (linear decay at the end).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sllm.config import TrainConfig


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # elsewhere (MPS) torch picks its default kernel


def _adamw(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = True if device.type in FUSED_ADAMW_DEVICES else None
    groups = decay_groups(params, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


ADAFACTOR_USUAL_LR = 1e-2  # torch's default and the paper's relative step size


def optimizer_hint(cfg: TrainConfig) -> str | None:
    """A line for a learning rate on the wrong scale: Adafactor at AdamW's 6e-4 barely moves weights
    of RMS 0.02, a run that seems to train but stays at chance."""
    if cfg.optimizer == "adafactor" and cfg.lr < ADAFACTOR_USUAL_LR / 10:
        return (
            f"note: Adafactor's steps are train.lr times each weight's RMS, so train.lr={cfg.lr:g} "
            f"barely moves the weights; its usual value is train.lr={ADAFACTOR_USUAL_LR:g}"
        )
    return None


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers that together update every trainable parameter once."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if cfg.optimizer == "adafactor":
        return [torch.optim.Adafactor(decay_groups(params, cfg.weight_decay), lr=cfg.lr)]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in hidden_ids]
        muon = torch.optim.Muon(
            hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, adjust_lr_fn="match_rms_adamw"
        )
        return [muon, _adamw(rest, cfg, device)] if rest else [muon]
    return [_adamw(params, cfg, device)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` as a fraction of `train.lr`."""
    floor = cfg.min_lr / cfg.lr
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay_steps)) / decay_steps))
        return 1.0 - progress * (1.0 - floor)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
