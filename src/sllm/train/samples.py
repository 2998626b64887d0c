"""Fixed-prompt samples at each evaluation, written to `samples/step-NNNNNN.md` of the run, so
progress is visible as text, not only as loss. A config without prompts samples the first
words of the first validation documents (`opening_prompts`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import takewhile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sllm.infer.engine import stream_tokens
from sllm.run import SAMPLES_DIR
from sllm.runtime import Dtype
from sllm.sampling import SamplingParams
from sllm.tokenizer import Tokenizer

SCANNED_TOKENS = 1 << 20  # where the first documents' starts are looked for
OPENING_TOKENS = 24  # read of each document for its first words


def sample_prompts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams,
    device: torch.device,
    amp_dtype: Dtype = None,
    encode: Callable[[str], list[int]] | None = None,
    stop_id: int | None = None,
) -> list[tuple[str, str]]:
    """(prompt, continuation) for each prompt, continued until EOS or `stop_id`."""
    encode = encode or tokenizer.encode
    was_training = model.training
    model.eval()
    results = []
    for prompt in prompts:
        ids = encode(prompt)[-(model.block_size - 1) :] or [tokenizer.eos_id]
        stream = stream_tokens(
            model, ids, params, tokenizer.eos_id, device, amp_dtype, tokenizer.never_generated
        )
        new = list(takewhile(lambda token: token != stop_id, stream))
        stream.close()
        results.append((prompt, tokenizer.decode(new)))
    model.train(was_training)
    return results


def opening_prompts(tokens: np.ndarray, tokenizer: Tokenizer, count: int = 3, words: int = 3) -> list[str]:
    """The first `words` words of the first `count` documents: prompts in the data's own style."""
    head = np.asarray(tokens[:SCANNED_TOKENS])
    prompts = []
    for start in [0, *(np.flatnonzero(head == tokenizer.eos_id) + 1)][:count]:
        ids = head[start : start + OPENING_TOKENS].tolist()
        ended = tokenizer.eos_id in ids
        found = tokenizer.decode(ids[: ids.index(tokenizer.eos_id)] if ended else ids).split()
        found = found if ended else found[:-1]  # the last word may go on past the tokens read
        if found:
            prompts.append(" ".join(found[:words]))
    return prompts


def write_samples(run_dir: Path, step: int, samples: list[tuple[str, str]]) -> Path:
    directory = run_dir / SAMPLES_DIR
    directory.mkdir(exist_ok=True)
    path = directory / f"step-{step:06d}.md"
    body = "\n\n".join(f"**{prompt}**{continuation}" for prompt, continuation in samples)
    path.write_text(f"# Samples at step {step}\n\n{body}\n", encoding="utf-8")
    return path
