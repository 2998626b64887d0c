"""`sllm bench generate`: how fast a run generates, per batch size.

Random prompts and greedy decoding (EOS ignored, so every run does the same work) through the
`TokenStream` chat and serve use, after one warm-up run. Reported: time to first token, prefill
and decode tokens/s, peak memory (CUDA: torch's allocations; CPU: peak resident set). Prompt +
new tokens must fit the context (no refill is timed); counts that do not are refused up front.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sllm.errors import UserError
from sllm.infer.engine import TextGenerator, TokenStream
from sllm.progress import progress_bar
from sllm.run import read_run_config
from sllm.sampling import SamplingParams

DEFAULT_NEW_TOKENS = 128  # taken only as far as the context allows


@dataclass
class GenerationSpeed:
    batch: int
    prompt_tokens: int
    new_tokens: int
    first_token_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_mib: float


def measure_generation(
    generator: TextGenerator, batch: int, prompt_tokens: int, new_tokens: int
) -> GenerationSpeed:
    """Greedy generation of `new_tokens` for `batch` random prompts, timed after one untimed run of
    the same shape (on CUDA the decode rate includes each stream's graph capture)."""
    model, device = generator.model, generator.device
    vocab = model.cfg.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows = prompts.tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def stream() -> TokenStream:
        return TokenStream(
            model, rows, params, None, device, generator.amp_dtype, compile_step=generator.compile_step
        )

    list(stream())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first = start
    for step, _ in enumerate(stream()):
        if step == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    if device.type == "cuda":
        peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return GenerationSpeed(
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        first_token_ms=(first - start) * 1e3,
        prefill_tokens_per_s=batch * prompt_tokens / (first - start),
        decode_tokens_per_s=batch * (new_tokens - 1) / max(end - first, 1e-9),
        peak_memory_mib=peak_memory_mib,
    )


def tokens_to_generate(context: int, prompt_tokens: int, new_tokens: int | None) -> int:
    """New tokens per prompt (default: up to DEFAULT_NEW_TOKENS that fit), at least 2."""
    if prompt_tokens < 1:
        raise UserError(f"--prompt-tokens must be 1 or more, got {prompt_tokens}")
    if new_tokens is None:
        new_tokens = min(DEFAULT_NEW_TOKENS, context - prompt_tokens)
        if new_tokens < 2:
            raise UserError(
                f"--prompt-tokens {prompt_tokens} leaves no room for 2 new tokens in the run's "
                f"context of {context} tokens; give at most {context - 2}"
            )
    if new_tokens < 2:
        raise UserError(
            f"--new-tokens {new_tokens} leaves no decode step to time (the first token comes from "
            "the prefill); give 2 or more"
        )
    if prompt_tokens + new_tokens > context:
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the run's context "
            f"of {context} tokens; lower one of them"
        )
    return new_tokens


def bench_generate(
    run_dir: str | Path,
    device: str = "auto",
    batch_sizes: list[int] | tuple[int, ...] = (1, 8, 32, 64),
    prompt_tokens: int = 16,
    new_tokens: int | None = None,
    threads: int = 0,
    compile_step: bool = False,
) -> list[GenerationSpeed]:
    """One row per batch size; `threads` > 0 sets torch's CPU threads."""
    if min(batch_sizes) < 1:
        raise UserError(f"batch sizes must be 1 or more, got {min(batch_sizes)}")
    context = read_run_config(Path(run_dir)).model.block_size
    new_tokens = tokens_to_generate(context, prompt_tokens, new_tokens)
    if threads > 0:
        torch.set_num_threads(threads)
    generator = TextGenerator.from_run(run_dir, device, compile_step=compile_step)
    rows = []
    total = sum(batch_sizes) * new_tokens  # the timed tokens; the bar moves between shapes only
    with progress_bar(desc="bench", total=total, unit=" tokens", unit_scale=True) as bar:
        for batch in batch_sizes:
            rows.append(measure_generation(generator, batch, prompt_tokens, new_tokens))
            bar.update(batch * new_tokens)
    return rows


def format_table(rows: list[GenerationSpeed]) -> str:
    lines = [
        f"{'batch':>5} {'prompt':>6} {'new':>5} {'first token ms':>14} {'prefill tok/s':>13} "
        f"{'decode tok/s':>12} {'peak MiB':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r.batch:>5} {r.prompt_tokens:>6} {r.new_tokens:>5} {r.first_token_ms:>14.1f} "
            f"{r.prefill_tokens_per_s:>13,.0f} {r.decode_tokens_per_s:>12,.0f} {r.peak_memory_mib:>9,.0f}"
        )
    return "\n".join(lines)
