"""llama.cpp against sllm on the same checkpoint, per GGUF weight type: a markdown table of the
largest logit difference and how many greedy tokens agree (prompts in Korean and English).

Without --runs it trains two small models on the demo's Korean legal text first (a GPT-2 and a
Llama-style one: RoPE, RMSNorm, SwiGLU, grouped-query attention; a few minutes each on 2 CPU cores).
Needs llama-cpp-python (pip install -e ".[llama-cpp]", a source build). From the repository root:

    PYTHONPATH=src python benchmarks/gguf_parity.py [--runs runs/demo ...] [--dtypes f32 f16 q8_0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sllm.config import load_config
from sllm.data.prepare import prepare
from sllm.demo import demo_corpus
from sllm.export_gguf import check_gguf, export_gguf
from sllm.train.trainer import train

PROMPTS = ["대한민국은", "The people of Korea"]
SMALL = [  # the demo's model and data, trained for a quarter of its tokens
    "train.max_steps=150", "train.micro_batch=8", "train.eval_interval=150", "train.checkpoint_interval=150",
    "train.device=cpu", "log.progress=false", "log.tensorboard=false",
]  # fmt: skip
LLAMA_STYLE = [
    "model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false", "model.n_kv_head=2",
]  # fmt: skip


def small_runs(workdir: Path) -> list[Path]:
    """A GPT-2 and a Llama-style run, trained briefly on the demo's Korean legal text."""
    data = load_config("demo", [f"data.inputs={json.dumps(demo_corpus())}", f"data.dir={workdir / 'data'}"])
    prepare(data.data, data.tokenizer, log=lambda _: None)
    runs = []
    for name, options in (("gpt2", []), ("llama", LLAMA_STYLE)):
        run_dir = workdir / name
        overrides = [f"data.dir={workdir / 'data'}", f"train.out_dir={run_dir}", *SMALL, *options]
        train(load_config("demo", overrides), log=lambda _: None)
        runs.append(run_dir)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", type=Path, help="run directories (default: train two small ones)"
    )
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runs = args.runs or small_runs(workdir)
        print("| run | dtype | MiB | prompt | same prompt tokens | max logit diff | greedy tokens equal |")
        print("|---|---|---:|---|---|---:|---:|")
        for run_dir in runs:
            for dtype in args.dtypes:
                path = export_gguf(run_dir, workdir / f"{run_dir.name}-{dtype}.gguf", dtype=dtype)
                for prompt in PROMPTS:
                    p = check_gguf(run_dir, path, prompt=prompt, new_tokens=args.new_tokens)
                    print(
                        f"| {run_dir.name} | {dtype} | {path.stat().st_size / 2**20:.2f} | {prompt} "
                        f"| {p.same_prompt_tokens} | {p.max_logit_difference:.2e} "
                        f"| {p.greedy_tokens_equal}/{p.greedy_tokens} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
