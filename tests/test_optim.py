import math

import pytest
import torch

from sllm.config import ModelConfig, TrainConfig
from sllm.model import build_model
from sllm.train.optim import build_optimizers, lr_factor, optimizer_hint
from sllm.train.trainer import train

from .conftest import tiny_config


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert cfg.lr * lr_factor(0, cfg) == pytest.approx(0.1)
    assert cfg.lr * lr_factor(9, cfg) == pytest.approx(1.0)
    assert cfg.lr * lr_factor(60, cfg) == pytest.approx(0.55)
    assert cfg.lr * lr_factor(110, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert [lr_factor(s, cfg) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert cfg.lr * lr_factor(90, cfg) == pytest.approx(0.5)
    assert cfg.lr * lr_factor(100, cfg) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices_and_muon_only_on_block_matrices():
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    (adamw,) = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    decayed, plain = adamw.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0

    muon, rest = build_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    covered = [id(p) for opt in (muon, rest) for g in opt.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_adamw_takes_the_fused_kernel_measured_fastest_on_cpu_and_cuda(device):
    """docs/log.md: fused AdamW took a third of the foreach kernel's time on the CPU."""
    model = build_model(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    (adamw,) = build_optimizers(model, TrainConfig(), torch.device(device))
    assert adamw.defaults["fused"] is True and not adamw.defaults["foreach"]


@pytest.mark.parametrize("optimizer", ["adafactor", "muon"])
def test_other_optimizers_train_and_resume(tmp_path, prepared_dir, optimizer):
    run_dir = tmp_path / optimizer
    cfg = tiny_config(prepared_dir, run_dir, f"train.optimizer={optimizer}", "train.max_steps=40")
    result = train(cfg, log=lambda _: None)
    assert result.val_loss is not None and result.val_loss < math.log(512) - 0.2
    cfg = tiny_config(prepared_dir, run_dir, f"train.optimizer={optimizer}", "train.max_steps=50")
    assert train(cfg, log=lambda _: None).step == 50


def test_adafactor_with_an_adamw_learning_rate_gets_a_note():
    """Adafactor's step is lr × the weight's RMS: AdamW's lr leaves it near chance (a user walk
    saw 6.89 against ln(1000) = 6.91 after 80 steps)."""
    assert "usual value is train.lr=0.01" in optimizer_hint(TrainConfig(optimizer="adafactor", lr=6e-4))
    assert optimizer_hint(TrainConfig(optimizer="adafactor", lr=1e-2)) is None
    assert optimizer_hint(TrainConfig(optimizer="adamw", lr=6e-4)) is None
