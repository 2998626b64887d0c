"""Progress bars for every step that can take more than a few seconds, decided in one place.

A bar (tqdm: count, rate, ETA) goes to stderr only when stderr is a terminal (tqdm's
`disable=None`) and the command was not given `--quiet`, so output piped into a log stays
clean. `--quiet` is a context variable the CLI sets around one command, not a flag passed
down through every function that may draw a bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm import tqdm

QUIET: ContextVar[bool] = ContextVar("quiet", default=False)


def progress_bar(iterable: Iterable | None = None, show: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr; `show=False` (a rank but the first, `log.progress: false`) hides it too."""
    return tqdm(iterable, disable=None if show and not QUIET.get() else True, dynamic_ncols=True, **options)


@contextmanager
def stages(desc: str, count: int) -> Iterator[Callable[[str], None]]:
    """A bar over `count` long steps: call `step(name)` as each starts; it names the current one."""
    begun: list[str] = []
    with progress_bar(desc=desc, total=count, unit=" steps") as bar:

        def step(name: str) -> None:
            bar.update(1 if begun else 0)
            begun.append(name)
            bar.set_postfix_str(name)

        yield step
        bar.update(count - bar.n)
