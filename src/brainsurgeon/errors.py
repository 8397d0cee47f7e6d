"""Exceptions raised for bad input. Each message names the problem and the fix."""
import contextlib
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the user's line: the first frame outside
    brainsurgeon and outside contextlib (whose decorators wrap the public calls). A fixed number
    broke whenever a call gained a frame: the warnings of ``bs.prune`` named contextlib.py."""
    frame, level = sys._getframe(1), 1  # the function that calls warnings.warn is level 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


class BrainsurgeonError(ValueError):
    """Base class: bad input detected before any long work."""


class MemoryBudgetError(BrainsurgeonError):
    """A method would need more memory than its budget allows."""
