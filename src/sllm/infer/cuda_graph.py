"""The decode step as one CUDA graph: a token step replays every kernel with one launch.

At batch 1 a small model's step is a few hundred tiny kernels, and launching them from Python
takes longer than running them; a CUDA graph records the launches once and replays them.
A graph replays fixed addresses and shapes, so the step runs on a static `KVCache`
(`make_static`, `static_decoding`): the slot is a device tensor, attention spans the whole
cache under a mask, and the tokens go in through a fixed input buffer. Python bookkeeping
(`cache.length`) happens around the replay, never inside it.

Capture happens at the first decode step (three eager warm-up runs on a side stream, as
PyTorch's CUDA graph notes ask), on the cache's own device, once per decoder: the engine
lends decoders out between streams. Before it is trusted,
the graph's output buffer is poisoned and one replay must reproduce the eager logits; on any
failure or mismatch the stream goes on with the plain step and one warning. With
`as_graph=False` the static step runs eagerly, which is how the CPU tests cover it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sllm.model.gpt import KVCache

LOGIT_TOLERANCE = 0.05  # bf16 logits of the same step, replayed vs eager, relative to their size

Logits = Callable[[torch.Tensor], torch.Tensor]  # (batch, tokens) ids -> (batch, vocab) logits


class StaticDecodeStep:
    """`step(tokens)` = next-token logits (batch, vocab) for one new token per row.

    `static_forward` runs the model on the static cache (captured); `plain_forward` is the
    ordinary step, used once capture has failed."""

    def __init__(
        self, static_forward: Logits, plain_forward: Logits, cache: KVCache, batch: int, as_graph: bool
    ) -> None:
        self.static_forward, self.plain_forward = static_forward, plain_forward
        self.cache = cache
        cache.make_static()
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=cache.keys.device)
        self.as_graph = as_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.failed = False

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.plain_forward(tokens[:, None])
        self.tokens.copy_(tokens[:, None])
        self.cache.step_slot.fill_(self.cache.length)
        if self.as_graph and self.graph is None and not self._capture():
            self.failed = True
            return self.plain_forward(tokens[:, None])
        logits = self._replay() if self.as_graph else self._run()
        self.cache.length += 1
        return logits

    def _run(self) -> torch.Tensor:
        """The static step, eagerly (it leaves `cache.length` alone: `__call__` counts)."""
        self.cache.static_decoding = True
        try:
            return self.static_forward(self.tokens)
        finally:
            self.cache.static_decoding = False

    def _replay(self) -> torch.Tensor:
        """A copy: the graph's own output buffer is overwritten by the next replay."""
        with torch.cuda.device(self.tokens.device):
            self.graph.replay()
        return self.logits.clone()

    def _capture(self) -> bool:
        """Record the step; False if capture fails or its replay differs from eager."""
        try:
            with torch.cuda.device(self.tokens.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        eager = self._run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.logits = self._run()
            self.graph = graph
            self.logits.fill_(float("nan"))  # a graph that recorded nothing would leave eager's values
            gap = (self._replay() - eager).abs().max().item()
        except Exception as error:  # any failure to capture leaves the plain step, which works
            warnings.warn(f"CUDA graph capture failed ({error}); decoding eagerly", stacklevel=3)
            return False
        if not gap <= LOGIT_TOLERANCE * max(1.0, eager.abs().max().item()):
            warnings.warn(
                f"the CUDA graph's logits differ from eager by {gap}; decoding eagerly", stacklevel=3
            )
            return False
        return True
