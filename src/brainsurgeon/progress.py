"""Progress of long work: rich bars (with an ETA) on a terminal, one line per stage in a log, or nothing.

``progress=None`` (the library default) shows bars when stderr is a terminal and nothing otherwise.
The command line turns on *stage lines* (:func:`set_stage_lines`): without a terminal, each stage
prints one line on stderr when it starts (a log of what is running, not a bar redrawn per step);
``--quiet`` passes ``progress=False``, which prints nothing.

Stages nest (a method's layers, then each layer's row chunks): nested bars share one rich display,
each stage a line of its own, removed when it ends.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_stage_lines = False
_live = None  # the rich Progress on screen; nested stages add a task to it


def set_stage_lines(on: bool) -> None:
    """Without a terminal, print one line per stage when progress is on or automatic (the CLI's default)."""
    global _stage_lines
    _stage_lines = bool(on)


def _terminal() -> bool:
    return sys.stderr.isatty()


def progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return _terminal() or _stage_lines
    return bool(progress)


def stage(message: str, enabled: bool) -> None:
    """One line for a stage that has no loop of its own to show (e.g. "round 2/4: pruning to 0.600")."""
    if not enabled:
        return
    if _live is not None:
        _live.console.print(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _length(iterable, total):
    if total is not None:
        return total
    try:
        return len(iterable)
    except TypeError:
        return None


def track(iterable: Iterable[T], description: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from iterable
        return
    total = _length(iterable, total)
    if not _terminal():
        stage(f"{description}" + (f" [{total}]" if total else "") + " ...", True)
        yield from iterable
        return
    yield from _bar(iterable, description, total)


def _bar(iterable, description: str, total: int | None):
    global _live
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    owner = _live is None
    if owner:
        _live = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        )
        _live.start()
    progress = _live
    task = progress.add_task(description, total=total)
    try:
        for item in iterable:
            yield item
            progress.advance(task)
    finally:
        progress.remove_task(task)
        if owner:
            progress.stop()
            _live = None
