"""Which weights are prunable: every Linear, Conv1d and Conv2d weight and the packed query/key/value
projection (``in_proj_weight``) of ``nn.MultiheadAttention`` by default, filtered by name patterns.

A parameter shared by several modules (``b.weight = a.weight``) is one target: one mask, counted
once; the other holders are listed in ``Target.tied``. Weights of other kinds (Embedding,
ConvTranspose, LSTM/GRU, ...) are never pruned; :func:`unpruned_weights` lists them for the report.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import BrainsurgeonError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One prunable weight: the parameter ``attr`` (``"weight"``, or ``"in_proj_weight"`` of a
    MultiheadAttention) of the module ``module``; ``name`` keys its mask and report entry (the
    module name for ``weight``, ``"<module>.in_proj_weight"`` otherwise). ``tied``: the full names
    of the other parameters that are this very tensor."""

    name: str
    module: nn.Module
    attr: str = "weight"
    tied: tuple[str, ...] = ()
    #: the other prunable layers (Linear, Conv, attention) that use this tensor as their weight;
    #: an Embedding sharing it is only in ``tied`` (a lookup, not a product with an input)
    tied_layers: tuple[nn.Module, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def module_name(self) -> str:
        """The name of ``module`` in the model (``name`` without ``.in_proj_weight``)."""
        return self.name if self.attr == "weight" else self.name[: -len(self.attr)].rstrip(".")

    @property
    def param_name(self) -> str:
        """The parameter's name in the model (for ``torch.func.functional_call``)."""
        if self.attr != "weight":
            return self.name
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.MultiheadAttention):
            return "attention_in_proj"
        if isinstance(self.module, nn.Conv1d):
            return "conv1d"
        return "conv2d" if isinstance(self.module, nn.Conv2d) else "linear"

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an (out, in) matrix: conv filters are flattened (C_in * k...)."""
        w = self.weight
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


def _candidates(model: nn.Module) -> list[tuple[str, str, nn.Module, str]]:
    """(target name, module name, module, parameter attribute) of every prunable weight, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and isinstance(module.weight, torch.Tensor):
            found.append((name, name, module, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            # q, k and v projections packed in one (3E, E) weight: pruned as one layer
            found.append((f"{name}.in_proj_weight" if name else "in_proj_weight", name, module, "in_proj_weight"))
    return found


def _selected(names: tuple[str, str], include: list[str], exclude: list[str]) -> bool:
    """A pattern matches the target's name or its module's name."""
    match = lambda pats: any(fnmatch.fnmatchcase(n, p) for n in names for p in pats)  # noqa: E731
    return match(include) and not match(exclude)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter tensor, by tensor identity (tied parameters have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def find_targets(model: nn.Module, layers: LayerSpec = None) -> list[Target]:
    """The prunable weights of ``model`` in module order, after include/exclude patterns; a tied
    parameter once (at its first holder), and not at all if any of its holders is excluded."""
    include, exclude = parse_layer_spec(layers)
    holders = _holders(model)
    candidates = _candidates(model)
    # excluding any holder of a tied tensor excludes the tensor: pruning it would change that layer too
    seen = {id(getattr(m, a)) for n, mn, m, a in candidates if not _selected((n, mn), ["*"], exclude)}
    found = []
    for name, mname, module, attr in candidates:
        p = getattr(module, attr)
        if id(p) in seen or not _selected((name, mname), include, exclude):
            continue
        seen.add(id(p))
        t = Target(name, module, attr)
        names = tuple(n for n in holders.get(id(p), []) if n != t.param_name)
        layers_ = tuple(m for _, _, m, a in candidates if m is not module and getattr(m, a) is p)
        found.append(Target(name, module, attr, names, layers_))
    if not found:
        all_layers = [c[0] for c in _candidates(model)]
        if not all_layers:
            raise BrainsurgeonError(
                f"the model ({type(model).__name__}) has no prunable layers: brainsurgeon prunes "
                "nn.Linear, nn.Conv1d and nn.Conv2d weights and nn.MultiheadAttention's in_proj_weight"
            )
        raise BrainsurgeonError(
            f"no prunable layer matches layers={layers!r}; the model's prunable layers are: "
            + ", ".join(all_layers)
        )
    return found


def holder_modules(model: nn.Module, target: Target) -> list[nn.Module]:
    """``target.module`` and the other layers whose weight is the same tensor (``target.tied_layers``)."""
    return [target.module, *target.tied_layers]


def attention_owner(model: nn.Module, module: nn.Module) -> nn.MultiheadAttention | None:
    """The MultiheadAttention whose ``out_proj`` is ``module``: its forward reads out_proj's weight
    directly, so ``module`` itself is never called."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m.out_proj is module:
            return m
    return None


def register_input_capture(model: nn.Module, module: nn.Module, on_rows):
    """A forward pre-hook passing ``module``'s input rows (``layer_inputs.input_rows``) to
    ``on_rows(rows)`` at each call; returns its handle. For the out_proj of a MultiheadAttention
    the hook sits on the attention, and the rows are the attention's output before the projection:
    the same call with out_proj replaced by the identity (``torch.func.functional_call``)."""
    from .curvature.layer_inputs import input_rows

    owner = attention_owner(model, module)
    if owner is None:
        return module.register_forward_pre_hook(lambda mod, args: on_rows(input_rows(mod, args[0], args)))
    busy: list[bool] = []

    def hook(mod, args, kwargs):
        if busy:  # the identity-projection call below runs this hook again
            return None
        proj = mod.out_proj
        params = {"out_proj.weight": torch.eye(proj.in_features, dtype=proj.weight.dtype, device=proj.weight.device)}
        if proj.bias is not None:
            params["out_proj.bias"] = torch.zeros_like(proj.bias)
        busy.append(True)
        try:
            heads = torch.func.functional_call(mod, params, args, kwargs)[0]
        finally:
            busy.clear()
        on_rows(heads.reshape(-1, heads.shape[-1]))
        return None

    return owner.register_forward_pre_hook(hook, with_kwargs=True)


def unpruned_weights(model: nn.Module, targets: list[Target], layers: LayerSpec = None) -> dict[str, str]:
    """``{parameter name: why}`` for the weight matrices/kernels (2 or more dimensions) no target
    covers, except those the user's ``layers`` patterns left out on purpose."""
    include, exclude = parse_layer_spec(layers)
    covered = {id(t.weight) for t in targets}
    modules = dict(model.named_modules(remove_duplicate=False))
    holders = _holders(model)
    out = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.dim() < 2 or id(p) in covered:
            continue
        mname = pname.rpartition(".")[0]
        if not _selected((pname, mname), include, exclude):
            continue
        owner = modules.get(mname)
        ties = [n for n in holders.get(id(p), []) if n != pname]
        if ties:
            out[pname] = f"{type(owner).__name__} weight tied to {', '.join(ties)}, which is excluded or not prunable"
        elif isinstance(owner, (*PRUNABLE_TYPES, nn.MultiheadAttention)):
            out[pname] = f"{type(owner).__name__} weight left out of the targets"
        else:
            out[pname] = f"{type(owner).__name__} weights are not pruned by any method"
    return out
