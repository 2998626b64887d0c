"""`sllm demo`: tokenizer → prepare → train → eval → samples on bundled Korean legal text.

The corpus (the Korean constitution and ten bills) ships with `konlpy`, found without
importing it (that starts a JVM). The validation perplexity is printed next to a unigram
baseline's, so a user sees the model learned more than word frequencies.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, replace
from pathlib import Path

from sllm.config import load_config
from sllm.data.prepare import prepare
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.evaluate import evaluate_run, unigram_perplexity
from sllm.infer.engine import TextGenerator
from sllm.sampling import SamplingParams
from sllm.train.trainer import train

CORPORA = ("kolaw", "kobill")


def demo_corpus() -> list[str]:
    """The konlpy corpus directories, located without importing konlpy."""
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo corpus comes with the konlpy package; install it with `pip install konlpy`")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "corpus"
    folders = [root / name for name in CORPORA]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise UserError(
            f"konlpy is installed but lacks its corpus files ({', '.join(missing)}); reinstall it"
        )
    return [str(f) for f in folders]


def run_demo(overrides: list[str], data_dir: str, run_dir: str) -> dict[str, float]:
    """Run the whole pipeline; returns the validation and unigram-baseline perplexities."""
    cfg = load_config("demo", [f"train.out_dir={run_dir}", *overrides])
    cfg.data.dir, cfg.data.inputs = data_dir, demo_corpus()  # the demo's data, so its prompts stay
    meta = prepare(cfg.data, cfg.tokenizer)
    train(cfg)
    (val,) = evaluate_run(run_dir, ["val"], cfg.eval.stride, cfg.eval.batch_size, cfg.train.device)
    baseline = unigram_perplexity(
        open_split(data_dir, "train", meta), open_split(data_dir, "val", meta), meta.vocab_size
    )
    bits = f"{val.bits_per_byte:.3f} bits/byte"
    print(f"\nvalidation perplexity {val.perplexity:.2f} (unigram baseline {baseline:.2f}), {bits}")
    generator = TextGenerator.from_run(run_dir, cfg.train.device)
    params = SamplingParams.from_config(cfg.sample)
    for number, prompt in enumerate(cfg.sample.prompts):
        text = generator.generate(prompt, **asdict(replace(params, seed=params.seed + number)))
        print(f"\n[{prompt}]{text}")
    return {"val_perplexity": val.perplexity, "unigram_perplexity": baseline}
