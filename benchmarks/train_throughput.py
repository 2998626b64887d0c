"""Training throughput: sllm's GPT against `transformers`' GPT2LMHeadModel, same shape and batch.

Both models get the same weights (ours copied into GPT-2's Conv1D layout), the same random
token batches, AdamW with the same settings, and the same loss; the two are timed in
alternating rounds inside one process so machine load hits both alike. Prints a table of
tokens/s and the ratio, optionally with `torch.compile` of our model.

    python benchmarks/train_throughput.py --shape 10m --steps 10 --rounds 3
    python benchmarks/train_throughput.py --shape demo --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sllm.config import ModelConfig, TrainConfig
from sllm.model import build_model, count_parameters
from sllm.train.optim import build_optimizers

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


def _step_fn(model: torch.nn.Module, hf: bool):
    """One training step; each side uses its usual AdamW: `transformers`' users build
    torch's default, sllm's trainer builds its own (decay on matrices, fused kernel)."""
    if hf:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        (optimizer,) = build_optimizers(model, TrainConfig(lr=1e-4), torch.device("cpu"))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
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
    torch.manual_seed(0)
    cfg = ModelConfig(dropout=0.0, **SHAPES[args.shape])
    ours = build_model(cfg)
    contenders = {
        "transformers": _step_fn(hf_gpt2_from(ours, cfg), hf=True),
        "sllm": _step_fn(ours, hf=False),
    }
    if args.compile:
        contenders["sllm compiled"] = _step_fn(torch.compile(build_model(cfg)), hf=False)
    shape = (args.batch, cfg.block_size)
    batches = [
        (torch.randint(0, cfg.vocab_size, shape), torch.randint(0, cfg.vocab_size, shape))
        for _ in range(args.steps)
    ]
    for step in contenders.values():  # warm-up (and compilation)
        _tokens_per_s(step, batches[:2])
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            rates[name].append(_tokens_per_s(step, batches))
    baseline = statistics.median(rates["transformers"])
    size = f"{count_parameters(ours) / 1e6:.1f}M parameters"
    setup = f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"shape {args.shape} ({size}), batch {args.batch} × {cfg.block_size}, {setup}")
    print(f"{'model':<16} {'tokens/s':>10} {'vs transformers':>16}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:>10,.0f} {median / baseline:>15.2f}×")


if __name__ == "__main__":
    main()
