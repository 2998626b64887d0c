"""Generation speed of the sllm engine against `transformers` GPT-2 `generate` on the same weights.

A GPT with random weights is built in each chosen shape (default: `6x256`, the issue's,
and `demo`; one table), copied into a `GPT2LMHeadModel`
(`sllm.export.to_transformers`, the mapping the HF export writes) and checked for equal
logits first; ours then gets the CPU weight layout `TextGenerator` gives it. Both
generate greedily from the same random 16-token prompts, alternating sllm and transformers
each repeat so load on the machine hits both alike.
Tokens/s count new tokens end to end (prefill included), from the median repeat and from the
fastest one (on a shared machine the fastest is the better estimate of each side's own cost).
On the CPU a third column times our step's matrix products alone, every weight once per token
step as a decode step reads them: what the engine would reach with no other cost. On CUDA
(bf16 weights) the rows are sllm with its CUDA-graph step (captured by each stream, which
the time includes), `transformers` with its dynamic and its static (compiled) cache, sllm's
eager step and sllm's compiled CUDA-graph step, and
the fraction of the memory-bound limit (weight bytes over the copy bandwidth measured in the
same run) reached at batch 1.

    python benchmarks/generate_speed.py --threads 2      # the 6x256 and demo shapes, one table
    python benchmarks/generate_speed.py --shape 10m --batch-sizes 1 8
    python benchmarks/generate_speed.py --device cuda --shape gpt2-124m --new-tokens 256 --batch-sizes 1 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.export import to_transformers
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.infer.engine import TokenStream
from sllm.model import build_model, count_parameters
from sllm.sampling import SamplingParams

SHAPES = {
    "10m": {"n_layer": 6, "n_head": 5, "n_embd": 320, "vocab_size": 8192},
    "6x256": {"n_layer": 6, "n_head": 4, "n_embd": 256, "vocab_size": 8192},  # train_throughput's 10m
    "demo": {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 2048},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sllm(
    model, prompts: torch.Tensor, new_tokens: int, cuda_graph: bool | None = None, compiled: bool = False
) -> float:
    device = prompts.device
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    synchronize(device)
    start = time.perf_counter()
    for _ in TokenStream(model, prompts.tolist(), params, None, device, amp_dtype, cuda_graph, compiled):
        pass
    synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_transformers(hf, prompts: torch.Tensor, new_tokens: int, cache: str = "dynamic") -> float:
    """`cache="static"` is transformers' static cache, which it compiles the forward for."""
    synchronize(prompts.device)
    start = time.perf_counter()
    out = hf.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        cache_implementation=None if cache == "dynamic" else cache,
    )  # fmt: skip
    synchronize(prompts.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


@torch.inference_mode()
def time_matmul_floor(model: torch.nn.Module, batch: int, new_tokens: int) -> float:
    """Seconds for `new_tokens` steps of nothing but the model's matrix products on `batch` rows."""
    linears = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
    weights = [*linears, model.head_weight]
    inputs = [
        torch.randn(batch, weight.size(1), dtype=weight.dtype, device=weight.device) for weight in weights
    ]
    synchronize(weights[0].device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        for x, weight in zip(inputs, weights, strict=True):
            F.linear(x, weight)
    synchronize(weights[0].device)
    return time.perf_counter() - start


def memory_bound_tokens_per_s(model: torch.nn.Module, device: torch.device) -> float:
    """Batch-1 tokens/s if a step did nothing but read every weight once at the copy bandwidth
    measured here (a 2 GiB device-to-device copy reads and writes each byte)."""
    source = torch.empty(2**30, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    bandwidth = 10 * 2 * source.numel() * source.element_size() / (time.perf_counter() - start)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weight_bytes / 1e9:.3f} GB")
    return bandwidth / weight_bytes


def contenders(model, hf, device: torch.device) -> dict[str, Callable[[torch.Tensor, int], float]]:
    """Name -> seconds to generate; the first is sllm as users run it, the second the reference."""
    if device.type == "cuda":
        return {
            "sllm (CUDA graph)": lambda prompts, n: time_sllm(model, prompts, n),
            "transformers dynamic": lambda prompts, n: time_transformers(hf, prompts, n),
            "transformers static": lambda prompts, n: time_transformers(hf, prompts, n, "static"),
            "sllm eager": lambda prompts, n: time_sllm(model, prompts, n, cuda_graph=False),
            "sllm (CUDA graph, compiled)": lambda prompts, n: time_sllm(model, prompts, n, compiled=True),
        }
    return {
        "sllm": lambda prompts, n: time_sllm(model, prompts, n),
        "transformers": lambda prompts, n: time_transformers(hf, prompts, n),
        "matmul floor": lambda prompts, n: time_matmul_floor(model, prompts.size(0), n),
    }


def build_pair(shape: str, args: argparse.Namespace, device: torch.device) -> tuple:
    """Our model in `shape` with random weights and its `transformers` copy, checked equal first."""
    torch.manual_seed(0)
    block_size = max(256, args.prompt_tokens + args.new_tokens)
    model = build_model(ModelConfig(block_size=block_size, **SHAPES[shape])).eval()
    hf = to_transformers(model)
    probe = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.inference_mode():
        gap = (model(probe) - hf(probe).logits).abs().max().item()
    assert gap < 1e-4, f"logits differ by {gap}"
    if device.type == "cuda":  # bf16 weights, as `TextGenerator.from_run` gives them on CUDA
        model, hf = model.to(device, torch.bfloat16), hf.to(device, torch.bfloat16)
    else:
        use_column_major_weights(model)  # as `TextGenerator.from_run` does on CPU
    dtype = next(model.parameters()).dtype
    print(f"shape {shape}: {count_parameters(model) / 1e6:.1f}M parameters, {dtype}, logit gap {gap:.1e}")
    return model, hf


def time_rows(shape: str, model, hf, limit: float | None, args: argparse.Namespace, names: list[str]) -> None:
    """One table row per batch size for `shape`; `names` are the table's contender columns."""
    device = next(model.parameters()).device
    runs, reference = contenders(model, hf, device), names[1]
    for batch in args.batch_sizes:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_tokens), device=device)
        working = dict(runs)
        for name, run in runs.items():  # warm-up at the timed length: the compilation is done
            try:
                run(prompts, args.new_tokens)
            except Exception as error:  # one contender failing (a compiler, say) spares the others
                print(f"{name}: failed at batch {batch} ({type(error).__name__}: {error})")
                del working[name]
        times: dict[str, list[float]] = {name: [] for name in working}
        for _ in range(args.repeats):
            for name, run in working.items():
                times[name].append(run(prompts, args.new_tokens))
        tokens = batch * args.new_tokens
        rates = {name: (tokens / statistics.median(ts), tokens / min(ts)) for name, ts in times.items()}
        cells = [
            f"{rates[name][0]:,.0f} / {rates[name][1]:,.0f}" if name in rates else "failed" for name in names
        ]
        ratios = [
            f"{name} {rates[name][0] / rates[reference][0]:.2f}×"
            for name in rates
            if name != reference and reference in rates
        ]
        print(f"| {shape} | {batch} | " + " | ".join(cells) + " | " + ", ".join(ratios) + " |", flush=True)
        if limit and batch == 1 and rates:
            first = next(iter(rates))
            share = rates[first][0] / limit
            print(f"  batch 1: {first} reaches {share:.1%} of the memory-bound {limit:,.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=SHAPES, default=["6x256", "demo"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    pairs = {shape: build_pair(shape, args, device) for shape in args.shape}  # their lines before the table
    cuda = device.type == "cuda"
    limits = {
        shape: memory_bound_tokens_per_s(model, device) if cuda else None
        for shape, (model, _) in pairs.items()
    }
    names = list(contenders(*pairs[args.shape[0]], device))
    print(
        "| shape | batch | "
        + " | ".join(f"{name} tok/s (median / best)" for name in names)
        + f" | ratios to {names[1]} |"
    )
    print("|---" * (len(names) + 3) + "|")
    for shape, (model, hf) in pairs.items():
        time_rows(shape, model, hf, limits[shape], args, names)


if __name__ == "__main__":
    main()
