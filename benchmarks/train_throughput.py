"""Training throughput: sllm's trainer step against a plain PyTorch GPT and `transformers`' GPT-2.

Every contender trains a model of the same shape on micro-batches of the same size, timed in
alternating rounds inside one process, the order rotating, so machine load hits them alike;
on a shared CPU use many short rounds (`--steps 1 --rounds 15`). Ratios are to the first row:
of the medians, and the median of each round's ratio (steadier when the load swings).

- plain GPT: what a from-scratch PyTorch script writes (below: `nn.Linear`, SDPA, learned
  positions, LayerNorm, GELU MLP, tied head, full-logits cross-entropy) with torch's foreach
  AdamW (weight decay on matrices only) and the gradient norm clipped at 1.0. The reference.
- plain GPT + `sllm.model.cpu_linear` (CPUs with AVX-512): the same, its `F.linear` calls
  through oneDNN: the side-by-side that decides whether that module stays.
- `transformers` GPT2LMHeadModel (SDPA, sllm's weights copied) with the plain GPT's optimizer.
- sllm: `Trainer.train_step()` of `sllm.train.trainer`, the whole step a run takes (windows read
  from a prepared data dir, schedule, loss, clipping, sllm's optimizer). Its data is `sllm
  demo`'s Korean legal text, prepared character-level into a temporary directory with `model.vocab_size`
  set to the shape's. Rows for `train.chunked_loss`; `--compile` (`train.compile`),
  `--cpu-bf16` (`train.dtype=bf16`, and the plain GPT under bf16 autocast),
  `--checkpointing` (`train.activation_checkpointing`).
- CUDA: everything under bf16 autocast with TF32; `transformers` compiled leads, as in the
  issue that set the GPU target; rows with MFU (`sllm.model.stats`) and peak memory (the
  contender's weights and optimizer state plus what its steps allocate on top: all contenders
  share the device). `--auto-batch` repeats the table at the micro-batch
  `train.micro_batch: auto` picks.

    python benchmarks/train_throughput.py --shape 10m --steps 1 --rounds 15
    python benchmarks/train_throughput.py --shape demo --batch 16 --steps 2 --rounds 15
    python benchmarks/train_throughput.py --device cuda --shape gpt2-124m --batch 16 --auto-batch
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sllm.config import ModelConfig, load_config
from sllm.demo import demo_corpus
from sllm.export import to_transformers
from sllm.model import build_model, count_parameters
from sllm.model.cpu_linear import onednn_linears, onednn_suits_this_cpu
from sllm.model.stats import gpu_peak_flops, training_flops_per_token
from sllm.runtime import allow_tf32, autocast, keep_freed_memory
from sllm.train.batch_size import free_memory
from sllm.train.objectives import LanguageModeling
from sllm.train.trainer import Trainer

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor]

SHAPES = {
    "10m": dict(n_layer=6, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "ko-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=32000),
}


class PlainBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.attn_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2)
            for t in self.qkv(self.norm1(x)).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """GPT-2 as a from-scratch script writes it, the head tied to the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def plain_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """torch's foreach AdamW, decaying matrices only."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), foreach=True)


@dataclass
class Contender:
    """`step(x, y)` is one whole training step on a micro-batch of that shape."""

    step: Callable[[torch.Tensor, torch.Tensor], object]
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]


def script_contender(
    model: nn.Module,
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    amp: torch.dtype | None,
    linears: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Contender:
    """The training step a plain script writes, for any model that `logits` can call."""
    optimizer = plain_adamw(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(x.device, amp), linears():
            out = logits(model, x)
        F.cross_entropy(out.float().flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(step, model, [optimizer])


def plain_contender(
    cfg: ModelConfig, device: torch.device, micro_batch: int, *, amp=None, compiled=False, onednn=False
) -> Contender:
    torch.manual_seed(0)
    model = PlainGPT(cfg).to(device)
    linears = functools.partial(onednn_linears, device) if onednn else contextlib.nullcontext
    forward = torch.compile(model) if compiled else model
    return script_contender(model, lambda _, x: forward(x), amp, linears)


def transformers_contender(
    cfg: ModelConfig, device: torch.device, micro_batch: int, *, amp=None, compiled=False
) -> Contender:
    torch.manual_seed(0)
    hf = to_transformers(build_model(cfg), attn_implementation="sdpa").train().to(device)
    forward = torch.compile(hf) if compiled else hf
    return script_contender(hf, lambda _, x: forward(x, use_cache=False).logits, amp)


def prepare_demo_text(root: Path) -> Path:
    """`sllm demo`'s Korean legal text, prepared character-level (seconds) for sllm's trainer."""
    from sllm.data.prepare import prepare

    cfg = load_config(
        None,
        [
            f"data.inputs={json.dumps(demo_corpus())}",
            f"data.dir={root / 'data'}",
            "data.txt_mode=paragraph",
            "tokenizer.kind=char",
        ],
    )
    prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    return Path(cfg.data.dir)


def sllm_trainer(
    cfg: ModelConfig, device: torch.device, data_dir: Path, micro_batch: int | str, *overrides: str
) -> Trainer:
    shape = [f"model.{key}={getattr(cfg, key)}" for key in (*SHAPES["10m"], "dropout")]
    train_cfg = load_config(
        None,
        [
            f"data.dir={data_dir}", f"train.out_dir={data_dir.parent / 'run'}", *shape,
            f"train.micro_batch={micro_batch}", "train.grad_accum=1",
            "train.max_steps=1000000", f"train.device={device.type}", "train.eval_windows=1",
            "log.progress=false", "log.tensorboard=false", *overrides,
        ],
    )  # fmt: skip
    return Trainer(train_cfg, LanguageModeling(train_cfg), log=lambda *_: None)


def sllm_contender(
    cfg: ModelConfig, device: torch.device, micro_batch: int, data_dir: Path, *overrides: str
) -> Contender:
    """sllm's own step. The trainer reads its windows from its data, of the contenders' shape."""
    trainer = sllm_trainer(cfg, device, data_dir, micro_batch, *overrides)
    return Contender(lambda x, y: trainer.train_step(), trainer.model, trainer.optimizers)


def build_contenders(
    cfg: ModelConfig, device: torch.device, data_dir: Path, args: argparse.Namespace
) -> dict[str, Callable[[int], Contender]]:
    """Name -> a builder taking the micro-batch. The first row is the reference."""
    plain = functools.partial(functools.partial, plain_contender, cfg, device)
    theirs = functools.partial(functools.partial, transformers_contender, cfg, device)

    def sllm(*overrides: str) -> Callable[[int], Contender]:
        return lambda micro_batch: sllm_contender(cfg, device, micro_batch, data_dir, *overrides)

    if device.type == "cuda":
        amp = torch.bfloat16
        contenders = {
            "transformers compiled": theirs(amp=amp, compiled=True),
            "transformers eager": theirs(amp=amp),
            "plain GPT eager": plain(amp=amp),
            "plain GPT compiled": plain(amp=amp, compiled=True),
            "sllm eager": sllm(),
            "sllm compiled": sllm("train.compile=true"),
            "sllm compiled, chunked loss": sllm("train.compile=true", "train.chunked_loss=true"),
        }
    else:
        contenders = {"plain GPT": plain(), "transformers": theirs()}
        if onednn_suits_this_cpu():
            contenders["plain GPT + sllm.model.cpu_linear"] = plain(onednn=True)
        contenders["sllm"] = sllm()
        contenders["sllm, train.chunked_loss"] = sllm("train.chunked_loss=true")
        if args.compile:
            contenders["sllm, train.compile"] = sllm("train.compile=true")
        if args.cpu_bf16:
            contenders["plain GPT, bf16 autocast"] = plain(amp=torch.bfloat16)
            contenders["sllm, train.dtype=bf16"] = sllm("train.dtype=bf16")
    if args.checkpointing:
        compiled = ["train.compile=true"] if device.type == "cuda" else []
        contenders["sllm, activation checkpointing"] = sllm("train.activation_checkpointing=true", *compiled)
    return contenders


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens_per_s(contender: Contender, batches: list[Batch]) -> float:
    device = batches[0][0].device
    synchronize(device)
    started = time.perf_counter()
    for x, y in batches:
        contender.step(x, y)
    synchronize(device)
    return sum(x.numel() for x, _ in batches) / (time.perf_counter() - started)


def measure(
    builders: dict[str, Callable[[int], Contender]], batches: list[Batch], rounds: int
) -> dict[str, tuple[list[float], float]]:
    """Tokens/s per round and peak memory (MiB, CUDA only) of each contender that ran. All
    contenders stay built together and rounds rotate their order; one that runs out of memory
    (at a large auto micro-batch, say), in warm-up or in a round, is dropped with a note."""
    micro_batch = batches[0][0].size(0)
    contenders = {name: build(micro_batch) for name, build in builders.items()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = dict.fromkeys(contenders, 0.0)
    for name in list(contenders):  # warm-up (and compilation); it also makes optimizer state
        if _unless_out_of_memory(lambda name=name: _tokens_per_s(contenders[name], batches[:2])) is None:
            _drop(contenders, name, micro_batch)
    names = list(contenders)
    for round_index in range(rounds):
        first = round_index % len(names)  # rotate the order: no contender always runs first
        for name in names[first:] + names[:first]:
            if name not in contenders:
                continue
            timed = _unless_out_of_memory(lambda name=name: _timed_step(contenders[name], batches))
            if timed is None:
                _drop(contenders, name, micro_batch)
                continue
            rates[name].append(timed[0])
            peaks[name] = max(peaks[name], timed[1])
    return {name: (rates[name], peaks[name]) for name in names if name in contenders}


def _drop(contenders: dict[str, Contender], name: str, micro_batch: int) -> None:
    print(f"{name}: out of memory at micro-batch {micro_batch}", flush=True)
    del contenders[name]
    free_memory()


def _timed_step(contender: Contender, batches: list[Batch]) -> tuple[float, float]:
    """Tokens/s, and on CUDA the contender's own peak in MiB: its weights and optimizer state
    plus the most its steps allocated on top of what was allocated before them. (All
    contenders stay on the device together, so the device's peak would count the others'
    weights and optimizer state as well.)"""
    device = batches[0][0].device
    if device.type != "cuda":
        return _tokens_per_s(contender, batches), 0.0
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    rate = _tokens_per_s(contender, batches)
    steps = torch.cuda.max_memory_allocated(device) - before
    return rate, (resident_bytes(contender) + steps) / 2**20


def resident_bytes(contender: Contender) -> int:
    """Bytes a contender keeps between steps: weights and optimizer state (gradients are set
    to None after each step)."""
    tensors = [*contender.model.parameters()] + [
        value
        for optimizer in contender.optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    ]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _unless_out_of_memory(run: Callable[[], T]) -> T | None:
    """`run()`, or None if it ran out of memory. Memory is freed by `_drop`, not here: emptying
    CUDA's cache after every round would make the next round allocate inside its timing."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return None


def auto_micro_batch(cfg: ModelConfig, device: torch.device, data_dir: Path, limit: int = 256) -> int:
    """The micro-batch `train.micro_batch: auto` picks for sllm's step with the chunked loss."""
    trainer = sllm_trainer(
        cfg, device, data_dir, "auto", f"train.batch_size={limit}", "train.chunked_loss=true"
    )
    trainer.settle_micro_batch()
    return trainer.plan.micro_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="10m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (sequences)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--compile", action="store_true", help="CPU: also time train.compile")
    parser.add_argument("--cpu-bf16", action="store_true", help="CPU: also time bf16 autocast")
    parser.add_argument("--checkpointing", action="store_true", help="also time activation checkpointing")
    parser.add_argument(
        "--auto-batch", action="store_true", help="also time the largest micro-batch that fits"
    )
    args = parser.parse_args()
    if args.auto_batch and args.device != "cuda":
        parser.error("--auto-batch needs --device cuda: on the CPU running out of memory kills the process")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as sllm's trainer does on the CPU; process-wide, so every contender gains
    allow_tf32(device)
    cfg = ModelConfig(dropout=0.0, **SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as root:
        data_dir = prepare_demo_text(Path(root))
        builders = build_contenders(cfg, device, data_dir, args)
        micro_batches = [args.batch]
        if args.auto_batch:
            micro_batches.append(auto_micro_batch(cfg, device, data_dir))
            free_memory()
        print_tables(cfg, device, args, builders, micro_batches)


def print_tables(
    cfg: ModelConfig,
    device: torch.device,
    args: argparse.Namespace,
    builders: dict[str, Callable[[int], Contender]],
    micro_batches: list[int],
) -> None:
    flops_per_token = training_flops_per_token(build_model(cfg), cfg, cfg.block_size)
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    setup = f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, torch {torch.__version__}"
    size = f"{count_parameters(build_model(cfg)) / 1e6:.1f}M parameters"
    reference = next(iter(builders))
    print(f"shape {args.shape} ({size}), {device}, {setup}, {torch.get_num_threads()} threads")
    print(f"| micro-batch | contender | tokens/s | vs {reference} | same round | MFU | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for micro_batch in micro_batches:
        shape = (micro_batch, cfg.block_size)
        batches = [
            (
                torch.randint(0, cfg.vocab_size, shape, device=device),
                torch.randint(0, cfg.vocab_size, shape, device=device),
            )
            for _ in range(args.steps)
        ]
        results = measure(builders, batches, args.rounds)
        reference_rates = results[reference][0] if reference in results else [float("nan")]
        baseline = statistics.median(reference_rates)
        for name, (values, peak) in results.items():
            median = statistics.median(values)
            paired = statistics.median(
                ours / theirs for ours, theirs in zip(values, reference_rates, strict=False)
            )
            mfu = f"{median * flops_per_token / peak_flops:.1%}" if peak_flops else "–"
            memory = f"{peak:,.0f}" if peak else "–"
            print(
                f"| {micro_batch} | {name} | {median:,.0f} | {median / baseline:.2f}× | {paired:.2f}× "
                f"| {mfu} | {memory} |",
                flush=True,
            )
        free_memory()


if __name__ == "__main__":
    main()
