"""Generation speed of the sllm engine against `transformers` GPT-2 `generate` on the same weights.

A GPT with random weights is built in the chosen shape, copied into a `GPT2LMHeadModel`
(GPT-2's Conv1D layers store weights transposed; `gelu_new` is our tanh GELU) and checked
for equal logits first; ours then gets the CPU weight layout `TextGenerator` gives it. Both
generate greedily from the same random 16-token prompts, alternating sllm and transformers
each repeat so load on the machine hits both alike.
Tokens/s count new tokens end to end (prefill included), from the median repeat and from the
fastest one (on a shared machine the fastest is the better estimate of each side's own cost).
The last columns time our step's matrix products alone, every weight once per token step as a
decode step reads them: what the engine would reach with no other cost, and its ratio.

    python benchmarks/generate_speed.py --shape 10m --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.infer.engine import TokenStream
from sllm.infer.sampling import SamplingParams
from sllm.model import build_model, count_parameters

SHAPES = {
    "10m": {"n_layer": 6, "n_head": 5, "n_embd": 320, "vocab_size": 8192},
    "demo": {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 2048},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304},
}


def to_transformers(model: torch.nn.Module):
    """A GPT2LMHeadModel holding `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=None, eos_token_id=None,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        )
    )  # fmt: skip
    ours = model.state_dict()
    names = {"wte.weight": "transformer.wte.weight", "wpe.table.weight": "transformer.wpe.weight",
             "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}  # fmt: skip
    parts = {"norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "norm2": "ln_2",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}  # fmt: skip
    for layer in range(cfg.n_layer):
        for our, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{layer}.{our}.{kind}"] = f"transformer.h.{layer}.{theirs}.{kind}"
    state = {}
    for our, theirs in names.items():
        tensor = ours[our]
        is_conv1d = tensor.dim() == 2 and ("attn.c_" in theirs or "mlp.c_" in theirs)
        state[theirs] = tensor.t().contiguous() if is_conv1d else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("attn.bias") for name in missing):
        raise RuntimeError(f"weight mapping is off: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def time_sllm(model, prompts: torch.Tensor, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    start = time.perf_counter()
    for _ in TokenStream(model, prompts.tolist(), params, None, torch.device("cpu")):
        pass
    return time.perf_counter() - start


@torch.inference_mode()
def time_transformers(hf, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = hf.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


@torch.inference_mode()
def time_matmul_floor(model: torch.nn.Module, batch: int, new_tokens: int) -> float:
    """Seconds for `new_tokens` steps of nothing but the model's matrix products on `batch` rows."""
    linears = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
    weights = [*linears, model.head_weight]
    inputs = [torch.randn(batch, weight.size(1)) for weight in weights]
    start = time.perf_counter()
    for _ in range(new_tokens):
        for x, weight in zip(inputs, weights, strict=True):
            F.linear(x, weight)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="10m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block_size = max(256, args.prompt_tokens + args.new_tokens)
    model = build_model(ModelConfig(block_size=block_size, **SHAPES[args.shape])).eval()
    hf = to_transformers(model)
    use_column_major_weights(model)  # as `TextGenerator.from_run` does on CPU
    probe = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.inference_mode():
        gap = (model(probe) - hf(probe).logits).abs().max().item()
    assert gap < 1e-4, f"logits differ by {gap}"
    threads = torch.get_num_threads()
    print(f"shape {args.shape}: {count_parameters(model) / 1e6:.1f}M parameters, fp32, {threads} threads, "
          f"torch {torch.__version__}, logit gap {gap:.1e}")  # fmt: skip
    print(
        f"{'batch':>5} {'':>6} {'sllm tok/s':>11} {'transformers tok/s':>19} {'ratio':>6} "
        f"{'matmul floor tok/s':>19} {'floor ratio':>11}"
    )
    for batch in args.batch_sizes:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_tokens))
        time_sllm(model, prompts, 4), time_transformers(hf, prompts, 4), time_matmul_floor(model, batch, 4)
        ours, theirs, floor = [], [], []
        for _ in range(args.repeats):
            ours.append(time_sllm(model, prompts, args.new_tokens))
            theirs.append(time_transformers(hf, prompts, args.new_tokens))
            floor.append(time_matmul_floor(model, batch, args.new_tokens))
        tokens = batch * args.new_tokens
        for label, pick in (("median", statistics.median), ("best", min)):
            ours_rate, theirs_rate, floor_rate = (tokens / pick(times) for times in (ours, theirs, floor))
            print(
                f"{batch:>5} {label:>6} {ours_rate:>11,.0f} {theirs_rate:>19,.0f} "
                f"{ours_rate / theirs_rate:>5.2f}x {floor_rate:>19,.0f} {floor_rate / theirs_rate:>10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
