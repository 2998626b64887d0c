"""Generation: prefill a batch of prompts once, then decode one token per row per step.

- `TokenStream` is the engine. Prompts of different lengths are left-padded into one
  preallocated `KVCache` (the cache supplies each row's positions and attention mask), so a
  step is one forward pass of shape (batch, 1) whatever the lengths. Finished rows (EOS, a
  stop string, `stop(row)`) keep their slot, so shapes stay static, and are ignored.
- Elsewhere a decode step runs as a `DecodeStep`: the model's one-token forward without
  `nn.Module` calls, whose overhead is most of a small model's step on a CPU.
- On CUDA each decode step is replayed as one CUDA graph (`sllm.infer.cuda_graph`). The
  decoder holding the graph and its cache is lent from `STATIC_DECODERS` and given back when
  the stream ends, so a server captures once per batch size, not per request.
- When the cache fills the context, every row's newest three quarters are prefilled again
  into the same cache and decoding goes on. Models without a KV cache (the ffn baseline)
  rerun each row's window every step.
- `TextGenerator` is text in, text out for a run directory. `TextRow` turns a row's tokens
  into text pieces: it waits for complete UTF-8 characters and holds back any tail that could
  still grow into a stop string, so a stop string split across tokens never leaks out and
  streaming yields exactly the non-streamed text.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sllm.errors import UserError
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.infer.cuda_graph import StaticDecodeStep
from sllm.infer.decode_step import DecodeStep, supports_decode_step
from sllm.infer.sampling import SamplingParams, TokenHistory, sample_next
from sllm.run import open_run
from sllm.runtime import autocast, select_autocast_dtype, select_device
from sllm.tokenizer import Tokenizer


class _CachedDecoder:
    """Next-token logits (batch, vocab) for a left-padded batch through a preallocated cache.
    Decode steps run as a `DecodeStep` (the model's step without module calls) where the model
    allows; with `static_steps`, as a `StaticDecodeStep` (a CUDA graph on CUDA), with
    `compile_step` passed through `torch.compile` first."""

    def __init__(
        self, model: nn.Module, batch: int, device: torch.device, amp_dtype: torch.dtype | None,
        static_steps: bool = False, max_len: int | None = None, compile_step: bool = False,
    ) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype
        dtype = amp_dtype or next(model.parameters()).dtype
        self.cache = model.new_cache(batch, device, dtype, max_len)
        self.static_step = None
        self.decode_step = DecodeStep(model) if supports_decode_step(model) and not static_steps else None
        if static_steps:
            static = _compiled(self._graph_logits) if compile_step else self._graph_logits
            as_graph = device.type == "cuda"
            self.static_step = StaticDecodeStep(static, self._logits, self.cache, batch, as_graph)

    def _logits(self, idx: torch.Tensor, cache_casts: bool = True) -> torch.Tensor:
        """The head runs on the last position only: a prefill needs no logits for the prompt."""
        with autocast(self.device, self.amp_dtype, cache_casts):
            return self.model(idx, self.cache, last_position_only=True)[:, -1].float()

    def _graph_logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self._logits(idx, cache_casts=False)

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in rows)
        pad = [width - len(ids) for ids in rows]
        idx = torch.tensor(
            [[0] * p + ids for p, ids in zip(pad, rows, strict=True)], dtype=torch.long, device=self.device
        )
        self.cache.reset(pad)
        return self._logits(idx)

    def step(self, tokens: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """`tokens` (batch,) were just sampled; `rows` are the texts so far, for a refill."""
        if self.cache.length >= self.cache.max_len:
            keep = (3 * self.cache.max_len) // 4
            return self.prefill([ids[-keep:] for ids in rows])
        if self.static_step is not None:
            return self.static_step(tokens)
        if self.decode_step is not None:
            with autocast(self.device, self.amp_dtype):
                return self.decode_step(tokens, self.cache).float()
        return self._logits(tokens[:, None])


class _WindowDecoder:
    """For models without a KV cache: each row's last `block_size` tokens, every step."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        logits = []
        with autocast(self.device, self.amp_dtype):
            for ids in rows:
                idx = torch.tensor([ids[-self.model.block_size :]], dtype=torch.long, device=self.device)
                logits.append(self.model(idx)[:, -1, :].float())
        return torch.cat(logits)

    def step(self, tokens: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        return self.prefill(rows)


def _compiled(step: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile` of a decoder's static step. Every decoder's step is the same code, which
    dynamo recompiles per decoder (it guards on the cache object) and would silently stop
    compiling after its default 8; the step only runs eagerly while its graph is captured."""
    compiled = torch.compile(step, dynamic=False)

    def run(idx: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=COMPILED_STEPS_LIMIT):
            return compiled(idx)

    return run


COMPILED_STEPS_LIMIT = 256


class _StaticDecoders:
    """Idle static-step decoders, kept on each model between streams: a stream borrows one and
    gives it back when it ends, so each batch size's CUDA graph is captured once, not once per
    request. A stream that finds none idle (another stream is running) builds its own. The
    key holds the weights' addresses and the model's mode, so weights moved or replaced since,
    or a switch between train and eval mode (dropout), give a new capture.
    The pool lives in the model's `__dict__` (a decoder holds its model, so a table keyed by
    model would keep every model alive)."""

    KEEP = 4  # batch sizes kept per model; each holds a KV cache

    @staticmethod
    def idle(model: nn.Module) -> dict[tuple, _CachedDecoder]:
        return vars(model).setdefault("_idle_static_decoders", _IdleDecoders())

    @contextmanager
    def borrow(self, stream: TokenStream) -> Iterator[_CachedDecoder]:
        """A decoder for `stream`'s model, batch size, cache length, device and options."""
        model, batch, max_len = stream.model, len(stream.rows), stream.static_cache_len()
        options = (stream.device, stream.amp_dtype, stream.compile_step)
        weights = tuple(p.data_ptr() for p in model.parameters())
        key = (batch, max_len, *options, model.training, weights)
        idle = self.idle(model)
        decoder = idle.pop(key, None)
        if decoder is None:
            device, amp_dtype, compile_step = options
            decoder = _CachedDecoder(
                model, batch, device, amp_dtype, static_steps=True, max_len=max_len, compile_step=compile_step
            )
        try:
            yield decoder
        finally:
            if not decoder.static_step.failed:
                if len(idle) >= self.KEEP:
                    idle.pop(next(iter(idle)))
                idle[key] = decoder


class _IdleDecoders(dict):
    """A model's idle decoders. A copied model starts with none: CUDA graphs cannot be copied,
    and a copy has weights of its own anyway."""

    def __deepcopy__(self, memo: dict) -> _IdleDecoders:
        return _IdleDecoders()


STATIC_DECODERS = _StaticDecoders()
STATIC_CACHE_STEP = 128  # static caches come in multiples of this many tokens


class TokenStream:
    """New tokens of a batch, step by step: each item holds one token per row, None once the
    row is finished (EOS, which is not yielded, or `stop(row)`). Iterate it once.

    `cuda_graph` (default: on CUDA) replays each decode step as one CUDA graph; True on
    another device runs that same static step eagerly, False keeps the plain step.
    `compile_step` also passes that step through `torch.compile` (fused kernels; it costs a
    compilation at the first stream, and its gain on a GPU is not yet measured).
    `banned_ids` are never sampled (`Tokenizer.never_generated`)."""

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
    ) -> None:
        if not prompts or not all(prompts):
            raise ValueError("every prompt must hold at least one token")
        self.model = model
        self.rows = [list(ids[-model.block_size :]) for ids in prompts]
        self.params = params
        self.eos_id = eos_id
        self.device = device
        self.amp_dtype = amp_dtype
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.compile_step = compile_step
        self.banned_ids = banned_ids
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
        batch = len(self.rows)
        if not self.model.supports_kv_cache:
            decoder = nullcontext(_WindowDecoder(self.model, self.device, self.amp_dtype))
        elif self.cuda_graph and self.params.max_new_tokens > 1:  # one token needs only the prefill
            decoder = STATIC_DECODERS.borrow(self)
        else:
            decoder = nullcontext(_CachedDecoder(self.model, batch, self.device, self.amp_dtype))
        with decoder as borrowed:
            yield from self._decode(borrowed)

    def static_cache_len(self) -> int:
        """A static step attends over its whole cache, so the cache holds what this stream
        needs (in steps of STATIC_CACHE_STEP, to share graphs), not the whole context."""
        needed = max(len(ids) for ids in self.rows) + self.params.max_new_tokens
        return min(self.model.block_size, STATIC_CACHE_STEP * math.ceil(needed / STATIC_CACHE_STEP))

    def _decode(self, decoder: _CachedDecoder | _WindowDecoder) -> Iterator[list[int | None]]:
        params, batch = self.params, len(self.rows)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        history = None
        if params.uses_history:
            history = TokenHistory(self.rows, self.model.cfg.vocab_size, self.device)
        banned = torch.tensor(self.banned_ids, dtype=torch.long, device=self.device)
        logits = decoder.prefill(self.rows) if params.max_new_tokens else None
        for step in range(params.max_new_tokens):
            if self.banned_ids:
                logits = logits.index_fill(1, banned, float("-inf"))
            tokens = sample_next(logits, params, history, generator)
            new = self._accept(tokens.tolist())
            if any(token is not None for token in new):
                yield new
            if self.done:
                return
            if history is not None:
                history.add(tokens)
            if step + 1 < params.max_new_tokens:
                logits = decoder.step(tokens, self.rows)
        for row in range(batch):
            self.stop(row, "length")

    def _accept(self, tokens: list[int]) -> list[int | None]:
        new: list[int | None] = []
        for row, token in enumerate(tokens):
            if self.finish_reasons[row] is None and token == self.eos_id:
                self.stop(row)
            if self.finish_reasons[row] is not None:
                new.append(None)
                continue
            self.rows[row].append(token)
            new.append(token)
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
    """One prompt's new token ids until `max_new_tokens` or EOS (which is not yielded).

    For samples during training: no CUDA graph, since the model may be sharded (FSDP) and a
    capture would stall the training step for one short sample."""
    stream = TokenStream(
        model, [prompt_ids], params, eos_id, device, amp_dtype, cuda_graph=False, banned_ids=banned_ids
    )
    for (token,) in stream:
        if token is not None:
            yield token


class TextRow:
    """One row's new tokens as text pieces, cut before the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that became final with `token` ("" while a character or stop is pending)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        return self._emit(self._final_length())

    def finish(self) -> str:
        """The rest, once no more tokens come."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
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
        return [
            Completion(text.text, reason or "length", prompt_tokens, len(text.ids))
            for text, reason, prompt_tokens in zip(
                self.texts, self.tokens.finish_reasons, self.prompt_tokens, strict=True
            )
        ]


class TextGenerator:
    """Text in, text out, for a trained run: `TextGenerator.from_run("runs/x").generate(...)`."""

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, device: torch.device, compile_step: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.amp_dtype = select_autocast_dtype(device)
        self.compile_step = compile_step

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str = "auto", checkpoint: str = "latest", compile_step: bool = False
    ) -> TextGenerator:
        """Load a run; on CUDA the weights become bf16 (or fp16), halving the bytes each step
        reads; on CPU they are laid out for MKL's fastest one-row products (`cpu_layout`).
        `compile_step` compiles the CUDA-graph decode step (`TokenStream`)."""
        chosen = select_device(device)
        if compile_step and chosen.type != "cuda":
            raise UserError(
                f"--compile compiles the CUDA-graph decode step; it needs CUDA, not {chosen.type}"
            )
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
        """Prompt ids. One longer than the context keeps its end with a warning, or with
        `strict` is a UserError."""
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
        prompt_ids = [self.encode_prompt(prompt, strict) for prompt in prompts]
        tokens = TokenStream(
            self.model, prompt_ids, params, self.tokenizer.eos_id, self.device, self.amp_dtype,
            compile_step=self.compile_step, banned_ids=self.tokenizer.never_generated,
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
