"""Structured (channel / neuron) pruning: dependency groups, criteria, compaction and cost.

``bs.prune(model, data, method, sparsity, structure="channel")`` removes whole output units and
returns a smaller model (``compact=False``: the same architecture with the units zeroed). The
interface for new criteria is in :mod:`.groups`.
"""
from .groups import Group, GroupSet, Importance, Member, StructuredContext, StructuredMethod, build_groups

__all__ = ["Group", "GroupSet", "Importance", "Member", "StructuredContext", "StructuredMethod", "build_groups"]
