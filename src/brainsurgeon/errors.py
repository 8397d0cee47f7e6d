"""Exceptions raised for bad input. Each message names the problem and the fix."""


class BrainsurgeonError(ValueError):
    """Base class: bad input detected before any long work."""


class MemoryBudgetError(BrainsurgeonError):
    """A method would need more memory than its budget allows."""
