"""Training throughput: sllm's GPT against `transformers`' GPT2LMHeadModel, same shape and batch.

Both models get the same weights (ours copied into GPT-2's Conv1D layout), the same random
token batches and the same loss; a row also times sllm's `train.chunked_loss` (the LM head
fused with the loss chunk by chunk). The contenders are timed in alternating rounds inside
one process so machine load hits them alike; on a shared machine use many short rounds
(`--steps 1 --rounds 15`). Prints tokens/s and the ratio to `transformers` with the same
optimizer as sllm (sllm's AdamW: decay on matrices, the fused kernel), and also
`transformers` with torch's default AdamW (multi-tensor kernel, same hyperparameters), which
is what a plain `transformers` training script gets; optionally with `torch.compile` of ours.

    python benchmarks/train_throughput.py --shape 10m --steps 1 --rounds 15 --threads 1 --compile
    python benchmarks/train_throughput.py --shape demo --steps 1 --rounds 15 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sllm.config import ModelConfig, TrainConfig
from sllm.model import build_model, count_parameters
from sllm.runtime import keep_freed_memory
from sllm.train.loop import chunked_loss, logits_loss
from sllm.train.optim import build_optimizers

CPU = torch.device("cpu")

SHAPES = {
    "10m": dict(n_layer=6, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}


def hf_gpt2_from(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """A GPT2LMHeadModel holding the same weights (Conv1D stores Linear weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, attn_implementation="sdpa",
    )  # fmt: skip
    hf = GPT2LMHeadModel(hf_cfg)
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
    names |= {"mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.table.weight}
    state |= {"transformer.ln_f.weight": model.norm_f.weight, "transformer.ln_f.bias": model.norm_f.bias}
    for i, block in enumerate(model.blocks):
        for ours, theirs in names.items():
            module = block.get_submodule(ours)
            transpose = isinstance(module, torch.nn.Linear)
            state[f"transformer.h.{i}.{theirs}.weight"] = module.weight.t() if transpose else module.weight
            state[f"transformer.h.{i}.{theirs}.bias"] = module.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    hf.tie_weights()
    return hf


def sllm_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    (optimizer,) = build_optimizers(model, TrainConfig(lr=1e-4), CPU)
    return optimizer


def default_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch's AdamW as a plain script builds it: every parameter decayed, default kernel."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())


def sllm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The trainer's default loss: full logits, fp32 cross-entropy."""
    return logits_loss(model, x, y, CPU, None)


def sllm_chunked_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return chunked_loss(model, x, y, CPU, None)


def _step_fn(model: torch.nn.Module, loss_fn, make_optimizer):
    """One training step: forward, loss, backward, clipping, optimizer step."""
    optimizer = make_optimizer(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _tokens_per_s(step, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    started = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return sum(x.numel() for x, _ in batches) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="10m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as sllm's trainer does on the CPU; process-wide, so transformers gains too
    torch.manual_seed(0)
    cfg = ModelConfig(dropout=0.0, **SHAPES[args.shape])
    ours = build_model(cfg)
    contenders = {
        "transformers, same AdamW as sllm": _step_fn(hf_gpt2_from(ours, cfg), hf_loss, sllm_adamw),
        "transformers, torch's default AdamW": _step_fn(hf_gpt2_from(ours, cfg), hf_loss, default_adamw),
        "sllm": _step_fn(ours, sllm_loss, sllm_adamw),
        "sllm, train.chunked_loss": _step_fn(build_model(cfg), sllm_chunked_loss, sllm_adamw),
    }
    if args.compile:
        contenders["sllm compiled"] = _step_fn(torch.compile(build_model(cfg)), sllm_loss, sllm_adamw)
    shape = (args.batch, cfg.block_size)
    batches = [
        (torch.randint(0, cfg.vocab_size, shape), torch.randint(0, cfg.vocab_size, shape))
        for _ in range(args.steps)
    ]
    for step in contenders.values():  # warm-up (and compilation)
        _tokens_per_s(step, batches[:2])
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(args.rounds):
        first = round_index % len(names)  # rotate the order: no contender always runs first
        for name in names[first:] + names[:first]:
            rates[name].append(_tokens_per_s(contenders[name], batches))
    baseline = statistics.median(rates["transformers, same AdamW as sllm"])
    size = f"{count_parameters(ours) / 1e6:.1f}M parameters"
    setup = f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"shape {args.shape} ({size}), batch {args.batch} × {cfg.block_size}, {setup}")
    print(f"{'model':<36} {'tokens/s':>10} {'vs transformers':>16}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<36} {median:>10,.0f} {median / baseline:>15.2f}×")


if __name__ == "__main__":
    main()
