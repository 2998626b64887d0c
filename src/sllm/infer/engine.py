"""Generation: batching, sampling, streaming and stop strings on top of the `Decoder`.

`TokenStream` samples one token per row per step: prompts of different lengths are left-padded
into one cache, so a step is one (batch, 1) forward; finished rows keep their slot, so shapes
stay static. `TextGenerator` is text in, text out for a run. `TextRow` turns a row's tokens into
text pieces: it waits for whole UTF-8 characters and holds back any tail that could still grow
into a stop string, so streaming yields exactly the non-streamed text; bytes that never become
a character are dropped, never shown as U+FFFD.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sllm.errors import UserError
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.infer.decoder import Decoder
from sllm.infer.logits import BannedTokens, TokenHistory, sample_next
from sllm.run import open_run
from sllm.runtime import select_autocast_dtype, select_device
from sllm.sampling import SamplingParams
from sllm.tokenizer import Tokenizer

BROKEN = "\ufffd"  # what decoding makes of bytes that are not (yet) a whole UTF-8 character


class TokenStream:
    """New tokens of a batch, step by step: one token per row per item, None once the row is finished
    (EOS, not yielded, or `stop(row)`). Iterate it once. `cuda_graph` (default: on CUDA) replays each
    step as a CUDA graph (True elsewhere: the same fixed-shape step, eagerly); `compile_step` also
    compiles it. `banned_ids` are never sampled; `stop_ids` are held back like EOS until
    `params.min_new_tokens`."""

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        eos_id: int | None,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile_step: bool = False,
        banned_ids: tuple[int, ...] = (),
        stop_ids: tuple[int, ...] = (),
    ) -> None:
        if not prompts or not all(prompts):
            raise ValueError("every prompt must hold at least one token")
        self.model, self.params, self.eos_id = model, params, eos_id
        self.rows = [list(ids[-model.block_size :]) for ids in prompts]
        self.device, self.amp_dtype, self.compile_step = device, amp_dtype, compile_step
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        ending = stop_ids if eos_id is None else (eos_id, *stop_ids)
        self.banned = BannedTokens(banned_ids, ending, params.min_new_tokens, device)
        self.finish_reasons: list[str | None] = [None] * len(prompts)

    def stop(self, row: int, reason: str = "stop") -> None:
        """Finish `row` now; the batch goes on without it."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        if self.done:  # every row was stopped before the stream started (a client hung up)
            return
        params, device = self.params, self.device
        fixed_shapes = self.cuda_graph and params.max_new_tokens > 1  # one token needs only the prefill
        needed = max(len(ids) for ids in self.rows) + params.max_new_tokens  # not the whole context
        decoder = Decoder(
            self.model, len(self.rows), device, self.amp_dtype, needed, fixed_shapes,
            self.compile_step and fixed_shapes,
        )  # fmt: skip
        generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        history = TokenHistory(self.rows, self.model.cfg.vocab_size, device) if params.uses_history else None
        logits = decoder.prefill(self.rows) if params.max_new_tokens else None
        for step in range(params.max_new_tokens):
            tokens = sample_next(self.banned(logits, step), params, history, generator)
            new = self._accept(tokens.tolist())
            if any(token is not None for token in new):
                yield new
            if self.done:
                return
            if history is not None:
                history.add(tokens)
            if step + 1 < params.max_new_tokens:
                logits = decoder.step(tokens, self.rows)
        for row in range(len(self.rows)):
            self.stop(row, "length")

    def _accept(self, tokens: list[int]) -> list[int | None]:
        new: list[int | None] = []
        for row, token in enumerate(tokens):
            if token == self.eos_id:
                self.stop(row)  # a row already finished keeps its reason
            finished = self.finish_reasons[row] is not None
            if not finished:
                self.rows[row].append(token)
            new.append(None if finished else token)
        return new


def stream_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_id: int | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    banned_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """One prompt's new ids until `max_new_tokens` or EOS (not yielded), for samples in training:
    no CUDA graph, as the model may be sharded and a capture would stall the step."""
    for (token,) in TokenStream(
        model, [prompt_ids], params, eos_id, device, amp_dtype, cuda_graph=False, banned_ids=banned_ids
    ):
        if token is not None:
            yield token


class TextRow:
    """One row's new tokens as text pieces, cut before the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """The text that became final with `token` ("" while a character or stop is pending)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(BROKEN):  # the next token may still complete the character
            return ""
        self.text = text.replace(BROKEN, "")
        return self._emit(self._final_length())

    def finish(self) -> str:
        """The rest, once no more tokens come; a character left incomplete is dropped."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids).replace(BROKEN, "")
            self._final_length()
        return self._emit(len(self.text))

    def _final_length(self) -> int:
        """Cuts `text` at a stop string; returns how much of it can no longer change."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return len(self.text)
        pending = max(
            (n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0
        )
        return len(self.text) - pending

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """(row, text piece) as pieces become final; `completions()` once it is exhausted."""

    def __init__(self, tokens: TokenStream, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokens = tokens
        self.texts = [TextRow(tokenizer, stop) for _ in tokens.rows]
        self.prompt_tokens = [len(ids) for ids in tokens.rows]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for step in self.tokens:
            for row, token in enumerate(step):
                if token is None:
                    continue
                piece = self.texts[row].add(token)
                if self.texts[row].stopped:
                    self.tokens.stop(row)
                if piece:
                    yield row, piece
        for row, text in enumerate(self.texts):
            piece = text.finish()
            if piece:
                yield row, piece

    def cancel(self) -> None:
        """Finish every row now, from any thread: the stream ends after the step in progress."""
        for row in range(len(self.texts)):
            self.tokens.stop(row, "cancelled")

    def completions(self) -> list[Completion]:
        rows = zip(self.texts, self.tokens.finish_reasons, self.prompt_tokens, strict=True)
        return [
            Completion(text.text, reason or "length", prompt, len(text.ids)) for text, reason, prompt in rows
        ]


class TextGenerator:
    """Text in, text out, for a trained run: `TextGenerator.from_run("runs/x").generate(...)`."""

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, device: torch.device, compile_step: bool = False
    ) -> None:
        self.model, self.tokenizer, self.device, self.compile_step = model, tokenizer, device, compile_step
        self.amp_dtype = select_autocast_dtype(device)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str = "auto", checkpoint: str = "latest", compile_step: bool = False
    ) -> TextGenerator:
        """Load a run: bf16 (or fp16) weights on CUDA, MKL's fastest layout on CPU (`cpu_layout`);
        `compile_step` compiles the decode step."""
        chosen = select_device(device)
        if compile_step and chosen.type != "cuda":
            raise UserError(f"--compile needs CUDA for its CUDA-graph decode step, not {chosen.type}")
        run = open_run(run_dir, chosen, checkpoint)
        low_precision = select_autocast_dtype(chosen)
        model = run.model.to(low_precision) if chosen.type == "cuda" and low_precision else run.model
        if chosen.type == "cpu":
            use_column_major_weights(model)
        return cls(model, run.tokenizer, chosen, compile_step)

    @property
    def context_tokens(self) -> int:
        return self.model.block_size

    def encode_prompt(self, prompt: str, strict: bool = False) -> list[int]:
        """Prompt ids; one over the context keeps its end with a warning, or with `strict` is refused."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        limit = self.model.block_size - 1
        if len(ids) > limit:
            message = f"the prompt has {len(ids)} tokens, more than the context allows ({limit})"
            if strict:
                raise UserError(f"{message}; shorten it")
            print(f"warning: {message}; keeping its last tokens", file=sys.stderr)
            ids = ids[-limit:]
        return ids

    def stream_batch(self, prompts: list[str], params: SamplingParams, strict: bool = False) -> TextStream:
        """The continuations of `prompts`, generated as one batch, as a stream of text pieces."""
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise UserError(f"prompts must be one or more strings, got {prompts!r}")
        return self.stream_ids([self.encode_prompt(prompt, strict) for prompt in prompts], params)

    def stream_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> TextStream:
        """As `stream_batch`, for prompts `encode_prompt` has encoded already."""
        stop_ids = tuple(ids[0] for ids in map(self.tokenizer.encode, params.stop) if len(ids) == 1)
        tokens = TokenStream(
            self.model, prompt_ids, params, self.tokenizer.eos_id, self.device, self.amp_dtype,
            compile_step=self.compile_step, banned_ids=self.tokenizer.never_generated, stop_ids=stop_ids,
        )  # fmt: skip
        return TextStream(tokens, self.tokenizer, params.stop)

    def complete(self, prompts: list[str], params: SamplingParams, strict: bool = False) -> list[Completion]:
        """The continuations of `prompts`, generated as one batch."""
        stream = self.stream_batch(prompts, params, strict)
        for _ in stream:
            pass
        return stream.completions()

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Text pieces of the continuation as they are generated."""
        for _, piece in self.stream_batch([prompt], SamplingParams(**sampling)):
            yield piece

    def generate(self, prompt: str | list[str], **sampling) -> str | list[str]:
        """The continuation of `prompt` (without the prompt); a list of prompts runs as a batch."""
        params = SamplingParams(**sampling)
        if isinstance(prompt, str):
            return self.complete([prompt], params)[0].text
        return [completion.text for completion in self.complete(prompt, params)]
