"""The one decode path: a static KV cache and the `Decoder` that runs the model over it.

`KVCache` is preallocated once per stream (layer, batch, kv_head, slot, head_dim); positions and
mask are sliced from tables made when a batch starts. An eager step starts at a Python int
(`at`) and reads plain slices of the filled prefix (no mask without padding); a captured or
compiled step (`at` None) reads every slot, masked, so its shapes never change. `Decoder`
prefills a left-padded batch, then steps one token per row; a full cache re-prefills each row's
newest three quarters; the ffn baseline recomputes its window through the same interface. On
CUDA the step is recorded once as a CUDA graph (three side-stream warm-ups) and trusted only if
a replay reproduces the eager logits, else it runs eagerly with one warning.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from sllm.config import ModelConfig
from sllm.runtime import autocast

CACHE_SLOT_STEP = 64  # a cache holds a multiple of this many slots: fewer shapes to compile
LOGIT_TOLERANCE = 0.05  # bf16 logits of the same step, replayed vs eager, relative to their size


class KVCache:
    """Keys and values of every layer for `slots` tokens per row, preallocated. Row b's first
    `pad[b]` slots hold padding, which real queries do not see. The mask is additive, in the cache's
    dtype: -inf above the diagonal, a large finite penalty on padding keys (a padding query keeps a
    finite softmax)."""

    def __init__(
        self, cfg: ModelConfig, batch: int, slots: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        n_kv_head, head_dim = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, n_kv_head, slots, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # One view per layer, made once (by indexing: views from `unbind` refuse in-place
        # writes when autograd is on).
        self.layer_keys = tuple(self.keys[layer] for layer in range(cfg.n_layer))
        self.layer_values = tuple(self.values[layer] for layer in range(cfg.n_layer))
        self.slots = slots
        self.at: int | None = None  # first slot of an eager forward; None on a fixed-shape step
        self.padded = False
        self.index = torch.arange(slots, device=device)
        future = self.index[None, :] > self.index[:, None]  # (query slot, key slot)
        self.causal = torch.zeros(slots, slots, device=device, dtype=dtype).masked_fill(future, float("-inf"))
        self.padding_penalty = torch.finfo(dtype).min / 2
        self.start = torch.zeros(1, dtype=torch.long, device=device)
        self.slot_positions = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.padding = torch.zeros(batch, slots, device=device, dtype=dtype)
        self.writing = self.index[:1]

    def reset(self, pad: list[int]) -> None:
        """Start over, in place, with `pad[b]` padding slots in front of row b."""
        first_real = torch.tensor(pad, device=self.index.device)[:, None]
        self.slot_positions.copy_((self.index[None, :] - first_real).clamp(min=0))
        self.padding.copy_((self.index[None, :] < first_real) * self.padding_penalty)
        self.padded = any(pad)
        self.start.zero_()

    def prepare(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (batch, length) and mask (batch, 1, length, keys) or None, of the next tokens."""
        if self.at is None:
            return self._prepare_fixed(length)
        end = self.at + length
        positions = self.slot_positions[:, self.at : end]
        if not self.padded and (length == 1 or self.at == 0):
            return positions, None
        return positions, self.causal[self.at : end, :end] + self.padding[:, None, None, :end]

    def _prepare_fixed(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the device tensor `start`, over every slot."""
        self.writing = self.start + self.index[:length]
        positions = self.slot_positions.index_select(1, self.writing)
        causal = self.causal.index_select(0, self.writing)
        return positions, causal + self.padding[:, None, None, :]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the tokens' keys and values; return those to attend over (filled slots, or all)."""
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        if self.at is None:
            keys.index_copy_(2, self.writing, k.to(keys.dtype))
            values.index_copy_(2, self.writing, v.to(values.dtype))
            return keys, values
        length = k.size(2)
        keys.narrow(2, self.at, length).copy_(k)  # copy_ casts to the cache's dtype
        values.narrow(2, self.at, length).copy_(v)
        return keys.narrow(2, 0, self.at + length), values.narrow(2, 0, self.at + length)


class Decoder:
    """Next-token logits (batch, vocab) for a left-padded batch of rows. `slots`: the most tokens a
    row will hold (default: the context), rounded up to CACHE_SLOT_STEP. `fixed_shapes` steps over
    the whole cache (a CUDA graph on CUDA, eager elsewhere); `compile_step` also compiles that step."""

    def __init__(
        self, model: nn.Module, batch: int, device: torch.device, amp_dtype: torch.dtype | None = None,
        slots: int | None = None, fixed_shapes: bool = False, compile_step: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.cache: KVCache | None = None
        if model.supports_kv_cache:
            dtype = amp_dtype or next(model.parameters()).dtype
            slots = CACHE_SLOT_STEP * math.ceil((slots or model.block_size) / CACHE_SLOT_STEP)
            self.cache = KVCache(model.cfg, batch, min(slots, model.block_size), device, dtype)
        self.length = 0  # filled slots
        self.fixed_shapes = fixed_shapes or compile_step
        self.fixed_step = torch.compile(self._fixed_step, dynamic=False) if compile_step else self._fixed_step
        self.as_graph = self.fixed_shapes and device.type == "cuda"
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.failed = False  # a capture failed: steps run eagerly

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Start over with `rows` (each at most the cache's slots long)."""
        if self.cache is None:
            return self._window_logits(rows)
        width = max(len(ids) for ids in rows)
        pad = [width - len(ids) for ids in rows]
        idx = [[0] * p + ids for p, ids in zip(pad, rows, strict=True)]
        self.cache.reset(pad)
        self.length = 0
        return self._eager(torch.tensor(idx, dtype=torch.long, device=self.device))

    def step(self, tokens: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """`tokens` (batch,) were just sampled and appended to `rows` (for a refill or a window)."""
        if self.cache is None:
            return self._window_logits(rows)
        if self.length == self.cache.slots:
            keep = max(1, 3 * self.cache.slots // 4)
            return self.prefill([ids[-keep:] for ids in rows])
        if not self.fixed_shapes or self.failed:
            return self._eager(tokens[:, None])
        self.tokens.copy_(tokens[:, None])
        self.cache.start.fill_(self.length)
        if self.as_graph and self.graph is None and not self._capture():
            self.failed = True
            return self._eager(tokens[:, None])
        logits = self._replay() if self.as_graph else self.fixed_step(self.tokens)
        self.length += 1
        return logits

    def _forward(self, idx: torch.Tensor, cache_casts: bool = True) -> torch.Tensor:
        """The model on `idx` after what the cache holds; the head runs on the last position only."""
        with autocast(self.device, self.amp_dtype, cache_casts):
            return self.model(idx, self.cache, last_position_only=True)[:, -1].float()

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        self.cache.at = self.length
        logits = self._forward(idx)
        self.length += idx.size(1)
        return logits

    def _fixed_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row over every slot; autocast's cast cache off (a graph would keep freed casts)."""
        self.cache.at = None
        return self._forward(tokens, cache_casts=False)

    def _window_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """For models without a KV cache: each row's last `block_size` tokens, every step."""
        block = self.model.block_size
        with autocast(self.device, self.amp_dtype):
            return torch.cat(
                [self.model(torch.tensor([ids[-block:]], device=self.device))[:, -1].float() for ids in rows]
            )

    def _replay(self) -> torch.Tensor:
        """A copy: the graph's own output buffer is overwritten by the next replay."""
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.graph_logits.clone()

    def _capture(self) -> bool:
        """Record the fixed step; False if capture fails or its replay differs from eager."""
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        eager = self.fixed_step(self.tokens)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.graph_logits = self.fixed_step(self.tokens)
            self.graph = graph
            self.graph_logits.fill_(float("nan"))  # a graph that recorded nothing would keep eager's
            gap = (self._replay() - eager).abs().max().item()
        except Exception as error:  # any failure to capture leaves the eager step, which works
            warnings.warn(f"CUDA graph capture failed ({error}); decoding eagerly", stacklevel=3)
            return False
        if not gap <= LOGIT_TOLERANCE * max(1.0, eager.abs().max().item()):
            warnings.warn(
                f"the CUDA graph's logits differ from eager by {gap}; decoding eagerly", stacklevel=3
            )
            return False
        return True
