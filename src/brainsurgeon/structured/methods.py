"""Importing this module registers every built-in structured criterion and variant."""
from . import criteria, eigendamage, reconstruction, search, second_order  # noqa: F401
from . import fisher_mask, flap, head_second_order, heads  # noqa: F401  (transformer heads / FFN neurons)
