"""Importing this module registers every built-in structured criterion and variant."""
from . import criteria, eigendamage, reconstruction, search, second_order  # noqa: F401
