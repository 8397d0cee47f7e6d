"""Architecture specs of pruned models: the base spec plus the modules pruning changed.

Structured pruning makes layers physically smaller, and EigenDamage replaces a layer by a small
``nn.Sequential``; the base spec (``models.make_spec`` or a factory) no longer rebuilds such a
model. ``spec_of(model, base)`` records, under ``"modules"``, every module whose constructor
arguments differ from a freshly built base model; ``models.build_model`` applies them, so the
saved weights load into a model of exactly the pruned shapes. Only plain data goes into the spec
(JSON, no pickling). Describable modules: Linear, Conv2d, BatchNorm1d/2d, and Sequential of these
(with ReLU / Identity / Flatten).

A description read from a file is data: :func:`check_description` accepts only these types, only
their constructor arguments, with bounded sizes (``MAX_FEATURES`` units, ``MAX_KERNEL`` per kernel
dimension, ``MAX_CHILDREN`` per Sequential, ``MAX_DEPTH`` nesting), before anything is constructed.
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


MAX_FEATURES = 1 << 20  # units (features, channels) of one layer in a description
MAX_KERNEL = 1 << 10  # kernel size, stride, padding, dilation per dimension
MAX_CHILDREN = 64  # modules in one described Sequential
MAX_DEPTH = 4  # nesting of described Sequentials
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int(desc: dict, key: str, low: int, high: int, where: str) -> int:
    v = desc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise BrainsurgeonError(f"{where}: {key!r} must be an integer in [{low}, {high}], got {v!r}; the spec is damaged")
    return v


def _pair(desc: dict, key: str, low: int, where: str) -> tuple[int, int]:
    v = desc.get(key)
    if not isinstance(v, list) or len(v) != 2:
        raise BrainsurgeonError(f"{where}: {key!r} must be a list of 2 integers, got {v!r}; the spec is damaged")
    return tuple(_int({key: x}, key, low, MAX_KERNEL, where) for x in v)


def _bool(desc: dict, key: str, where: str) -> bool:
    if not isinstance(desc.get(key), bool):
        raise BrainsurgeonError(f"{where}: {key!r} must be true or false, got {desc.get(key)!r}; the spec is damaged")
    return desc[key]


def _keys(desc: dict, allowed: set[str], where: str) -> None:
    """Exactly the constructor arguments ``describe`` writes, nothing else."""
    unknown, missing = set(desc) - allowed - {"type"}, allowed - set(desc)
    if unknown or missing:
        raise BrainsurgeonError(
            f"{where}: a {desc['type']} description takes exactly {sorted(allowed)}"
            + (f"; unknown {sorted(unknown)}" if unknown else "") + (f"; missing {sorted(missing)}" if missing else "")
        )


def _conv_args(desc: dict, where: str) -> dict:
    _keys(desc, {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                 "padding_mode"}, where)
    args = {k: _int(desc, k, 1, MAX_FEATURES, where) for k in ("in_channels", "out_channels", "groups")}
    if args["in_channels"] % args["groups"] or args["out_channels"] % args["groups"]:
        raise BrainsurgeonError(f"{where}: groups={args['groups']} must divide in_channels and out_channels")
    args.update({k: _pair(desc, k, 1, where) for k in ("kernel_size", "stride", "dilation")})
    pad = desc["padding"]
    args["padding"] = pad if pad in ("same", "valid") else _pair(desc, "padding", 0, where)
    if desc["padding_mode"] not in PADDING_MODES:
        raise BrainsurgeonError(f"{where}: padding_mode must be one of {PADDING_MODES}, got {desc['padding_mode']!r}")
    return {**args, "bias": _bool(desc, "bias", where), "padding_mode": desc["padding_mode"]}


def _batchnorm_args(desc: dict, where: str) -> dict:
    _keys(desc, {"num_features", "eps", "momentum", "affine", "track_running_stats"}, where)
    eps, momentum = desc["eps"], desc["momentum"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise BrainsurgeonError(f"{where}: 'eps' must be a number in (0, 1), got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1):
        raise BrainsurgeonError(f"{where}: 'momentum' must be null or a number in [0, 1], got {momentum!r}")
    return {"num_features": _int(desc, "num_features", 1, MAX_FEATURES, where), "eps": float(eps), "momentum": momentum,
            "affine": _bool(desc, "affine", where), "track_running_stats": _bool(desc, "track_running_stats", where)}


def check_description(desc, where: str = "module description", depth: int = 0) -> dict:
    """The validated constructor arguments of a description (data from a file), before anything is built.

    Only the types ``describe`` writes, only their arguments, with bounded sizes; anything else is a
    one-line error. Sequential returns ``{"children": [args, ...]}`` with each child's args checked.
    """
    kind = desc.get("type") if isinstance(desc, dict) else None
    if kind == "Linear":
        _keys(desc, {"in_features", "out_features", "bias"}, where)
        return {"in_features": _int(desc, "in_features", 1, MAX_FEATURES, where),
                "out_features": _int(desc, "out_features", 1, MAX_FEATURES, where), "bias": _bool(desc, "bias", where)}
    if kind == "Conv2d":
        return _conv_args(desc, where)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return _batchnorm_args(desc, where)
    if kind == "Sequential":
        _keys(desc, {"children"}, where)
        children = desc["children"]
        if not isinstance(children, list) or len(children) > MAX_CHILDREN or depth >= MAX_DEPTH:
            raise BrainsurgeonError(f"{where}: a Sequential holds a list of at most {MAX_CHILDREN} descriptions, "
                                    f"nested at most {MAX_DEPTH} deep; the spec is damaged")
        return {"children": [check_description(c, f"{where}[{i}]", depth + 1) for i, c in enumerate(children)]}
    if kind in ("ReLU", "Identity", "Flatten"):
        _keys(desc, set(), where)
        return {}
    raise BrainsurgeonError(
        f"architecture spec holds an unknown module description {str(desc)[:200]!r} at {where}; "
        "supported: Linear, Conv2d, BatchNorm1d/2d, Sequential, ReLU, Identity, Flatten"
    )


def construct(desc: dict) -> nn.Module:
    """The module ``describe`` described (fresh parameters); the description is checked first."""
    return _construct(desc["type"] if isinstance(desc, dict) else None, check_description(desc), desc)


def _construct(kind, args: dict, desc: dict) -> nn.Module:
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "Conv2d":
        return nn.Conv2d(**args)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**args)
    if kind == "Sequential":
        return nn.Sequential(*(_construct(d["type"], a, d) for d, a in zip(desc["children"], args["children"])))
    return getattr(nn, kind)()  # ReLU, Identity, Flatten: check_description allows nothing else


def spec_of(model: nn.Module, base: dict) -> dict:
    """``base`` plus ``"modules"``: every module of ``model`` that differs from ``build_model(base)``."""
    from .models import build_model

    # the model exists already: its own spec is trusted (factory included), and shapes suffice (meta)
    base_only = {k: v for k, v in base.items() if k != "modules"}
    fresh = dict(build_model(base_only, factory=base.get("factory"), max_params=None, device="meta").named_modules())
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
        if not isinstance(name, str) or not name:
            raise BrainsurgeonError(f"the spec's 'modules' names {name!r}, which is not a module path")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            parent.get_submodule(child)
        except AttributeError as e:
            raise BrainsurgeonError(f"the spec changes module {name!r}, which the architecture does not have") from e
        setattr(parent, child, construct(modules[name]))
    return model
