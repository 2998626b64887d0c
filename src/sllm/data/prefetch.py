"""Run a producer iterator in a background thread, a bounded number of items ahead.

Prepare reads and cleans documents in Python while the tokenizer encodes the previous batch in
Rust threads that release the GIL. A producer's exception is raised in the consumer; a consumer
that stops early stops the producer too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.1


def prefetched(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """The items of `items`, produced in a background thread up to `depth` ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
