"""Importing this module registers every built-in structured criterion (H's second-order ones too
when their module is listed here)."""
from . import criteria, search  # noqa: F401
