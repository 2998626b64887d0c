"""The decode step as one CUDA graph: a token step replays every kernel with one launch.

At batch 1 a small model's step is a few hundred tiny kernels, and launching them from Python
takes longer than running them; a CUDA graph records the launches once and replays them.
A graph replays fixed addresses and shapes, so the step runs on a static `KVCache`
(`make_static`): the slot is a device tensor, attention spans the whole cache under a mask,
and the tokens go in through a fixed input buffer. Python bookkeeping (`cache.length`) happens
around the replay, never inside it.

Capture happens at the first decode step of a stream (three eager warm-up runs on a side
stream, as PyTorch's CUDA graph notes ask), and the replayed logits are checked against the
eager ones: on any failure or mismatch generation goes on eagerly with one warning. On other
devices `replay` runs the same static step eagerly, which is how the CPU tests cover it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sllm.model.gpt import KVCache

LOGIT_TOLERANCE = 0.05  # bf16 logits of the same step, replayed vs eager


class StaticDecodeStep:
    """`step(tokens)` = next-token logits (batch, vocab) for one new token per row."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], cache: KVCache, batch: int) -> None:
        self.forward = forward
        self.cache = cache
        cache.make_static()
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=cache.keys.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.use_graph = cache.keys.device.type == "cuda"

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.cache.step_slot.fill_(self.cache.length)
        if self.use_graph and self.graph is None:
            self.use_graph = self._capture()
        logits = self._replay() if self.use_graph else self._run()
        self.cache.length += 1
        return logits

    def _run(self) -> torch.Tensor:
        """The step, eagerly; leaves `cache.length` as it found it."""
        length = self.cache.length
        logits = self.forward(self.tokens)
        self.cache.length = length
        return logits

    def _replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits

    def _capture(self) -> bool:
        """Record the step; False (eager from now on) if capture fails or replays differently."""
        try:
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
            gap = (self._replay() - eager).abs().max().item()
        except Exception as error:  # any failure to capture leaves eager decoding, which works
            warnings.warn(f"CUDA graph capture failed ({error}); decoding eagerly", stacklevel=2)
            return False
        if not gap <= LOGIT_TOLERANCE * max(1.0, eager.abs().max().item()):
            warnings.warn(
                f"the CUDA graph's logits differ from eager by {gap}; decoding eagerly", stacklevel=2
            )
            return False
        return True
