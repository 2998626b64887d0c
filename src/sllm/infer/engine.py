"""Generation: prefill the prompt once, then decode one token per step from the KV cache.

`stream_tokens` is the engine: a generator of token ids, so callers can print text as it
appears. Models without a KV cache (the ffn baseline) rerun the window each step. When the
cache fills the context, the newest three quarters of the text are prefilled again and
decoding goes on. `TextGenerator` wraps a run directory for text in, text out.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sllm.infer.sampling import SamplingParams, sample_next
from sllm.runs import open_run
from sllm.runtime import autocast, select_autocast_dtype, select_device
from sllm.tokenizer import Tokenizer


class _Decoder:
    """Feeds tokens to the model and returns next-token logits (1, vocab)."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype
        self.cache = None

    def _logits(self, ids: list[int]) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast(self.device, self.amp_dtype):
            return self.model(idx, self.cache)[:, -1, :].float()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        if self.model.supports_kv_cache:
            dtype = self.amp_dtype or next(self.model.parameters()).dtype
            self.cache = self.model.new_cache(1, self.device, dtype)
        return self._logits(ids[-self.model.block_size :])

    def step(self, ids: list[int]) -> torch.Tensor:
        """`ids` is the whole text so far; only its last token is new."""
        if self.cache is None:
            return self._logits(ids[-self.model.block_size :])
        if self.cache.length >= self.cache.max_len:
            return self.prefill(ids[-(3 * self.model.block_size) // 4 :])
        return self._logits(ids[-1:])


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_id: int | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens` or EOS (which is not yielded)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    decoder = _Decoder(model, device, amp_dtype)
    ids = list(prompt_ids)
    logits = decoder.prefill(ids)
    for _ in range(params.max_new_tokens):
        seen = torch.tensor([ids[-model.block_size :]], device=device)
        token = int(sample_next(logits, params, seen, generator)[0])
        if token == eos_id:
            return
        ids.append(token)
        yield token
        logits = decoder.step(ids)


class TextGenerator:
    """Text in, text out, for a trained run: `TextGenerator.from_run("runs/x").generate(...)`."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.amp_dtype = select_autocast_dtype(device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", checkpoint: str = "latest") -> TextGenerator:
        chosen = select_device(device)
        run = open_run(run_dir, chosen, checkpoint)
        return cls(run.model, run.tokenizer, chosen)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; a prompt longer than the context keeps its end, with a warning."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        limit = self.model.block_size - 1
        if len(ids) > limit:
            print(
                f"warning: the prompt has {len(ids)} tokens, more than the context allows ({limit}); "
                "keeping its last tokens",
                file=sys.stderr,
            )
            ids = ids[-limit:]
        return ids

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Text pieces as they are generated; a piece ends where the UTF-8 text is complete."""
        params = SamplingParams(**sampling)
        prompt_ids = self.encode_prompt(prompt)
        new_ids: list[int] = []
        emitted = ""
        for token in stream_tokens(
            self.model, prompt_ids, params, self.tokenizer.eos_id, self.device, self.amp_dtype
        ):
            new_ids.append(token)
            text = self.tokenizer.decode(new_ids)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        text = self.tokenizer.decode(new_ids)
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def generate(self, prompt: str, **sampling) -> str:
        """The continuation of `prompt` (without the prompt)."""
        return "".join(self.stream(prompt, **sampling))
