"""Training throughput: sllm's GPT against `transformers`' GPT2LMHeadModel, same shape and batch.

Both models get the same weights (ours copied into GPT-2's Conv1D layout), the same random
token batches and the same loss. Contenders are timed in alternating rounds inside one
process, the order rotating, so machine load hits them alike; on a shared CPU use many short
rounds (`--steps 1 --rounds 15`).

- CPU (fp32): the reference is `transformers` eager with the same optimizer as sllm (sllm's
  AdamW: decay on matrices, the fused kernel); a row gives it torch's default AdamW (what a
  plain script builds); rows for sllm's default loss, `train.chunked_loss`, sllm with MKL
  products where it would use oneDNN (`SLLM_CPU_MATMUL=mkl`, `sllm.model.cpu_linear`) and,
  with `--compile`, `torch.compile`; with `--cpu-bf16`, both models under bf16 autocast (fast
  on CPUs that multiply bf16 natively).
- CUDA (bf16 autocast, TF32, fused AdamW): the reference is `transformers` compiled, the
  issue's baseline; rows for both eager, sllm compiled, and sllm compiled with the chunked
  loss, with MFU (`sllm.model.stats`: 6·N + 12·L·d·T FLOPs per token over the GPU's bf16 peak)
  and peak memory (the contender's weights and optimizer state plus what its steps allocate on
  top: all contenders share the device, so its own peak would count the others' too).
- `--checkpointing` adds activation checkpointing; `--auto-batch` repeats the table at the
  largest power-of-two micro-batch that survives a step, as `train.micro_batch: auto` finds it.

    python benchmarks/train_throughput.py --shape 10m --steps 1 --rounds 15 --threads 1 --compile
    python benchmarks/train_throughput.py --device cuda --shape gpt2-124m --batch 16 \
        --checkpointing --auto-batch
    python benchmarks/train_throughput.py --device cuda --shape ko-350m --batch 8 --checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from sllm.config import ModelConfig, TrainConfig
from sllm.export import to_transformers
from sllm.model import build_model, count_parameters
from sllm.model.cpu_linear import onednn_chosen
from sllm.model.stats import gpu_peak_flops, training_flops_per_token
from sllm.runtime import allow_tf32, autocast, keep_freed_memory
from sllm.train.batch_size import free_memory, largest_fitting, power_of_two_sizes, survives
from sllm.train.objectives import chunked_loss, logits_loss
from sllm.train.optim import build_optimizers

T = TypeVar("T")

SHAPES = {
    "10m": dict(n_layer=6, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "ko-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=32000),
}


def sllm_adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    (optimizer,) = build_optimizers(model, TrainConfig(lr=1e-4), device)
    return optimizer


def default_adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW as a plain script builds it: every parameter decayed, default kernel."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


def hf_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None
) -> torch.Tensor:
    with autocast(x.device, amp):
        logits = model(x, use_cache=False).logits  # training builds no KV cache
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def sllm_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None
) -> torch.Tensor:
    """The trainer's default loss: full logits, fp32 cross-entropy."""
    return logits_loss(model, x, y, x.device, amp)


def sllm_chunked_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None
) -> torch.Tensor:
    return chunked_loss(model, x, y, x.device, amp)


@dataclass
class Contender:
    """One model with its loss and optimizer; `step(x, y)` is a whole training step."""

    model: torch.nn.Module
    loss_fn: Callable
    make_optimizer: Callable[[torch.nn.Module, torch.device], torch.optim.Optimizer]
    amp: torch.dtype | None
    cpu_matmul: str | None = None  # SLLM_CPU_MATMUL during this contender's steps

    def __post_init__(self) -> None:
        parameters = next(self.model.parameters())
        self.optimizer = self.make_optimizer(self.model, parameters.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with cpu_matmul(self.cpu_matmul):
            self.loss_fn(self.model, x, y, self.amp).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def cpu_matmul(choice: str | None) -> Iterator[None]:
    """`SLLM_CPU_MATMUL=choice` inside the block (None: leave the environment as it is)."""
    previous = os.environ.get("SLLM_CPU_MATMUL")
    if choice is not None:
        os.environ["SLLM_CPU_MATMUL"] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SLLM_CPU_MATMUL", None)
        else:
            os.environ["SLLM_CPU_MATMUL"] = previous


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens_per_s(contender: Contender, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    device = batches[0][0].device
    synchronize(device)
    started = time.perf_counter()
    for x, y in batches:
        contender.step(x, y)
    synchronize(device)
    return sum(x.numel() for x, _ in batches) / (time.perf_counter() - started)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def sllm_contender(
    cfg: ModelConfig,
    device: torch.device,
    loss_fn=sllm_loss,
    compiled=False,
    checkpointing=False,
    cpu_matmul: str | None = None,
) -> Contender:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.checkpoint_blocks = checkpointing
    return Contender(
        torch.compile(model) if compiled else model, loss_fn, sllm_adamw, amp_dtype(device), cpu_matmul
    )


def transformers_contender(
    cfg: ModelConfig, device: torch.device, make_optimizer=sllm_adamw, compiled=False
) -> Contender:
    torch.manual_seed(0)
    hf = to_transformers(build_model(cfg), attn_implementation="sdpa").train().to(device)
    return Contender(torch.compile(hf) if compiled else hf, hf_loss, make_optimizer, amp_dtype(device))


def in_bf16(build: Callable[[], Contender]) -> Callable[[], Contender]:
    """The same contender under bf16 autocast (the CPU rows of `--cpu-bf16`)."""

    def build_in_bf16() -> Contender:
        contender = build()
        contender.amp = torch.bfloat16
        return contender

    return build_in_bf16


def build_contenders(
    cfg: ModelConfig, device: torch.device, args: argparse.Namespace
) -> dict[str, Callable[[], Contender]]:
    """Name -> a builder. The first is the reference: on the CPU `transformers` eager with
    sllm's AdamW; on CUDA `transformers` compiled with bf16 autocast and the fused AdamW."""
    ours = functools.partial(functools.partial, sllm_contender, cfg, device)
    theirs = functools.partial(functools.partial, transformers_contender, cfg, device)
    if device.type == "cuda":
        contenders = {
            "transformers compiled": theirs(compiled=True),
            "transformers eager": theirs(),
            "sllm eager": ours(),
            "sllm compiled": ours(compiled=True),
            "sllm compiled, chunked loss": ours(sllm_chunked_loss, compiled=True),
        }
    else:
        contenders = {
            "transformers, same AdamW as sllm": theirs(),
            "transformers, torch's default AdamW": theirs(default_adamw),
            "sllm": ours(),
            "sllm, train.chunked_loss": ours(sllm_chunked_loss),
        }
        if onednn_chosen():  # the oneDNN layers against the MKL products they replace
            contenders["sllm, SLLM_CPU_MATMUL=mkl"] = ours(cpu_matmul="mkl")
        if args.compile:
            contenders["sllm compiled"] = ours(compiled=True)
        if args.cpu_bf16:
            contenders["transformers, bf16 autocast"] = in_bf16(theirs())
            contenders["sllm, bf16 autocast (train.dtype=bf16)"] = in_bf16(ours())
    if args.checkpointing:
        contenders["sllm, activation checkpointing"] = ours(
            compiled=device.type == "cuda", checkpointing=True
        )
    return contenders


def measure(
    builders: dict[str, Callable[[], Contender]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
) -> dict[str, tuple[list[float], float]]:
    """Tokens/s per round and peak memory (MiB, CUDA only) of each contender that ran. All
    contenders stay built together and rounds rotate their order; one that runs out of memory
    (at a large auto micro-batch, say), in warm-up or in a round, is dropped with a note."""
    contenders = {name: build() for name, build in builders.items()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = dict.fromkeys(contenders, 0.0)
    for name in list(contenders):  # warm-up (and compilation); it also makes optimizer state
        if _unless_out_of_memory(lambda name=name: _tokens_per_s(contenders[name], batches[:2])) is None:
            _drop(contenders, name, batches[0][0].size(0))
    names = list(contenders)
    for round_index in range(rounds):
        first = round_index % len(names)  # rotate the order: no contender always runs first
        for name in names[first:] + names[:first]:
            if name not in contenders:
                continue
            timed = _unless_out_of_memory(lambda name=name: _timed_step(contenders[name], batches))
            if timed is None:
                _drop(contenders, name, batches[0][0].size(0))
                continue
            rates[name].append(timed[0])
            peaks[name] = max(peaks[name], timed[1])
    return {name: (rates[name], peaks[name]) for name in names if name in contenders}


def _drop(contenders: dict[str, Contender], name: str, micro_batch: int) -> None:
    print(f"{name}: out of memory at micro-batch {micro_batch}", flush=True)
    del contenders[name]
    free_memory()


def _timed_step(
    contender: Contender, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
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
        for state in contender.optimizer.state.values()
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


def largest_micro_batch(cfg: ModelConfig, device: torch.device, limit: int = 256) -> int:
    """The micro-batch `train.micro_batch: auto` would pick for sllm's eager step with the
    chunked loss: the largest power of two up to `limit` that survives a training step."""
    contender = sllm_contender(cfg, device, sllm_chunked_loss)

    def step(size: int) -> None:
        x = torch.randint(0, cfg.vocab_size, (size, cfg.block_size), device=device)
        contender.step(x, x)

    return largest_fitting(power_of_two_sizes(limit), survives(step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="10m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (sequences)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--compile", action="store_true", help="CPU: also time torch.compile of our model")
    parser.add_argument(
        "--cpu-bf16", action="store_true", help="CPU: also time both models under bf16 autocast"
    )
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
        keep_freed_memory()  # as sllm's trainer does on the CPU; process-wide, so transformers gains too
    allow_tf32(device)
    cfg = ModelConfig(dropout=0.0, **SHAPES[args.shape])
    builders = build_contenders(cfg, device, args)
    micro_batches = [args.batch]
    if args.auto_batch:
        micro_batches.append(largest_micro_batch(cfg, device))
        free_memory()
    flops_per_token = training_flops_per_token(build_model(cfg), cfg, cfg.block_size)
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    setup = f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, torch {torch.__version__}"
    size = f"{count_parameters(build_model(cfg)) / 1e6:.1f}M parameters"
    print(f"shape {args.shape} ({size}), {device}, {setup}, {torch.get_num_threads()} threads")
    print("| micro-batch | contender | tokens/s | vs " + next(iter(builders)) + " | MFU | peak MiB |")
    print("|---|---|---|---|---|---|")
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
        reference = next(iter(builders))
        baseline = statistics.median(results[reference][0]) if reference in results else float("nan")
        for name, (values, peak) in results.items():
            median = statistics.median(values)
            mfu = f"{median * flops_per_token / peak_flops:.1%}" if peak_flops else "–"
            memory = f"{peak:,.0f}" if peak else "–"
            print(
                f"| {micro_batch} | {name} | {median:,.0f} | {median / baseline:.2f}× | {mfu} | {memory} |",
                flush=True,
            )
        free_memory()


if __name__ == "__main__":
    main()
