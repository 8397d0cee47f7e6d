"""Which layers are prunable: every Linear and Conv2d weight by default, filtered by name patterns."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import BrainsurgeonError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One prunable weight: the module at ``name`` and its ``weight`` parameter."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def kind(self) -> str:
        return "conv2d" if isinstance(self.module, nn.Conv2d) else "linear"

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an (out, in) matrix: conv filters are flattened (C_in * kh * kw)."""
        w = self.module.weight
        return w.reshape(w.shape[0], -1)


LayerSpec = None | str | Sequence[str] | Mapping[str, Sequence[str]]


def _patterns(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BrainsurgeonError(f"layers[{key!r}] must be a string or a list of name patterns, got {value!r}")


def parse_layer_spec(layers: LayerSpec) -> tuple[list[str], list[str]]:
    """``layers`` is None (all), a pattern or list of patterns to include, or
    ``{"include": [...], "exclude": [...]}``. Patterns are shell-style (``fnmatch``) on module names."""
    if layers is None:
        return ["*"], []
    if isinstance(layers, Mapping):
        unknown = set(layers) - {"include", "exclude"}
        if unknown:
            raise BrainsurgeonError(
                f"layers has unknown keys {sorted(unknown)}; use {{'include': [...], 'exclude': [...]}}"
            )
        include = _patterns(layers.get("include"), "include") or ["*"]
        return include, _patterns(layers.get("exclude"), "exclude")
    return _patterns(layers, "include"), []


def find_targets(model: nn.Module, layers: LayerSpec = None) -> list[Target]:
    """The prunable layers of ``model`` in module order, after include/exclude patterns."""
    include, exclude = parse_layer_spec(layers)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        found.append(Target(name, module))
    if not found:
        all_layers = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        if not all_layers:
            raise BrainsurgeonError(
                f"the model ({type(model).__name__}) has no prunable layers: brainsurgeon prunes "
                "nn.Linear and nn.Conv2d weights"
            )
        raise BrainsurgeonError(
            f"no prunable layer matches layers={layers!r}; the model's prunable layers are: "
            + ", ".join(all_layers)
        )
    return found
