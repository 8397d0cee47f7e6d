"""Architecture specs of pruned models: the base spec plus the modules pruning changed.

Structured pruning makes layers physically smaller, and EigenDamage replaces a layer by a small
``nn.Sequential``; the base spec (``models.make_spec`` or a factory) no longer rebuilds such a
model. ``spec_of(model, base)`` records, under ``"modules"``, every module whose constructor
arguments differ from a freshly built base model; ``models.build_model`` applies them, so the
saved weights load into a model of exactly the pruned shapes. Only plain data goes into the spec
(JSON, no pickling). Describable modules: Linear, Conv2d, BatchNorm1d/2d, and Sequential of these
(with ReLU / Identity / Flatten).
"""
from __future__ import annotations

from torch import nn

from .errors import BrainsurgeonError


def describe(module: nn.Module) -> dict:
    """The constructor arguments of ``module`` as JSON-able data."""
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {"type": type(module).__name__, "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    if isinstance(module, nn.Sequential):
        return {"type": "Sequential", "children": [describe(m) for m in module]}
    if isinstance(module, (nn.ReLU, nn.Identity, nn.Flatten)):
        return {"type": type(module).__name__}
    raise BrainsurgeonError(
        f"cannot describe a changed {type(module).__name__} in an architecture spec; supported: Linear, Conv2d, "
        "BatchNorm1d/2d, Sequential, ReLU, Identity, Flatten"
    )


def construct(desc: dict) -> nn.Module:
    """The module ``describe`` described (fresh parameters)."""
    kind = desc.get("type") if isinstance(desc, dict) else None
    args = {k: v for k, v in desc.items() if k != "type"} if kind else {}
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "Conv2d":
        for k in ("kernel_size", "stride", "dilation"):
            args[k] = tuple(args[k])
        if isinstance(args["padding"], list):
            args["padding"] = tuple(args["padding"])
        return nn.Conv2d(**args)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**args)
    if kind == "Sequential":
        return nn.Sequential(*(construct(c) for c in args["children"]))
    if kind in ("ReLU", "Identity", "Flatten"):
        return getattr(nn, kind)()
    raise BrainsurgeonError(f"architecture spec holds an unknown module description {desc!r}")


def spec_of(model: nn.Module, base: dict) -> dict:
    """``base`` plus ``"modules"``: every module of ``model`` that differs from ``build_model(base)``."""
    from .models import build_model

    fresh = dict(build_model({k: v for k, v in base.items() if k != "modules"}).named_modules())
    changed = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, nn.Sequential) and name in fresh and type(fresh[name]) is nn.Sequential:
            continue
        if name not in fresh:
            continue  # inside a replaced module: described with its parent
        try:
            desc = describe(module)
        except BrainsurgeonError:
            continue  # a container or custom block: its changed children are described themselves
        try:
            same = describe(fresh[name]) == desc
        except BrainsurgeonError:
            same = False
        if not same:
            changed[name] = desc
    spec = {k: v for k, v in base.items() if k != "modules"}
    if changed:
        spec["modules"] = changed
    return spec


def apply_modules(model: nn.Module, modules: dict) -> nn.Module:
    """Replace the named modules of ``model`` by the described ones (in place), parents first."""
    if not isinstance(modules, dict):
        raise BrainsurgeonError("the spec's 'modules' must map module names to descriptions")
    for name in sorted(modules, key=lambda n: n.count(".")):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            parent.get_submodule(child)
        except AttributeError as e:
            raise BrainsurgeonError(f"the spec changes module {name!r}, which the architecture does not have") from e
        setattr(parent, child, construct(modules[name]))
    return model
