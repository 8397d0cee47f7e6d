"""Progress bars for long work: rich, shown only on a terminal and never with ``quiet``."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def track(iterable: Iterable[T], description: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from iterable
        return
    from rich.progress import track as rich_track

    yield from rich_track(iterable, description=description, total=total, transient=True)
