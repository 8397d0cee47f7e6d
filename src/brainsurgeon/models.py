"""Reference models (LeNet-300-100, LeNet-5, a small ResNet, VGG-, MobileNet- and concat-style nets) and specs.

A *spec* is a JSON-able dict that rebuilds a model's architecture:
``{"arch": "lenet300", "kwargs": {...}}`` for a reference model, or
``{"factory": "package.module:function", "kwargs": {...}}`` for a user's model, optionally with
``"modules"`` (the layers a structured pruning changed, see :mod:`.architecture`).

A spec is data, never code. :func:`build_model` builds a reference architecture from kwargs that are
integers or lists of integers within bounds, and module descriptions of an allow-listed set of types
(:func:`.architecture.check_description`). A ``factory`` spec imports and calls user code, so it is
refused unless the caller names the same factory (``factory="package.module:function"``; on the
command line ``--factory``): a spec read from a file can therefore never run code by itself. The
model is first built on the ``meta`` device (no memory), its size is checked against
``MAX_PARAMS`` or against the shapes of the data it will receive (``expected``), and only then built
for real.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import BrainsurgeonError


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): a 784-300-100-10 MLP, the classic pruning benchmark."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, hidden=(300, 100)):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): two 5x5 conv layers with max-pooling, then 120-84-classes."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h, w = input_shape
        # Pad small inputs (8x8 digits) so both 5x5 convolutions and pools fit.
        pad = 2 if min(h, w) >= 16 else 4
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BN, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small CIFAR-style ResNet: stem, three stages of basic blocks, global pooling, linear head."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SmallVGG(nn.Module):
    """A VGG-style net (Simonyan & Zisserman 2015): 3x3 conv-BN-ReLU stages with max-pooling, MLP head."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, widths=(16, 32), hidden: int = 64):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class SmallMobileNet(nn.Module):
    """MobileNet-style (Howard et al. 2017): a stem, depthwise-separable blocks (3x3 depthwise
    conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU), global pooling, linear head."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        c = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        blocks: list[nn.Module] = []
        for i, width in enumerate(widths[1:]):
            blocks += [
                nn.Conv2d(c, c, 3, 2 if i else 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            ]
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class ConcatNet(nn.Module):
    """Inception-style branches joined by ``torch.cat`` (Szegedy et al. 2015): a 1x1 and a 3x3
    branch on the stem, concatenated, BN-ReLU, one more conv, global pooling, linear head."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(input_shape[0], width, 3, padding=1)
        self.branch1 = nn.Conv2d(width, width, 1)
        self.branch3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn = nn.BatchNorm2d(3 * width)
        self.conv = nn.Conv2d(3 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(torch.cat([self.branch1(x), self.branch3(x)], dim=1)))
        x = torch.relu(self.conv(x))
        return self.fc(x.mean(dim=(2, 3)))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet": SmallResNet,
    "vgg-bn": SmallVGG,
    "mobilenet": SmallMobileNet,
    "concat": ConcatNet,
}


MAX_PARAMS = 1 << 26  # elements a spec alone may declare (256 MiB of float32) when no data bounds it
MAX_INPUT = 1 << 24  # elements of a reference model's input_shape
MAX_BLOCKS = 64  # residual blocks per stage of the reference ResNet: each is Python objects, not just tensors
MAX_DESCRIBED = 4096  # changed-module descriptions (Sequential children included) in one spec
SPEC_KEYS = ("arch", "factory", "kwargs", "modules")


def _jsonable(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def make_spec(arch: str, **kwargs) -> dict:
    if arch not in ARCHITECTURES:
        raise BrainsurgeonError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return {"arch": arch, "kwargs": _jsonable(kwargs)}


def _size_int(v) -> bool:
    from .architecture import MAX_FEATURES

    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_FEATURES


def _check_arch_kwargs(arch: str, kwargs: dict) -> dict:
    """Reference-model kwargs are sizes: integers or short lists of integers, within bounds."""
    from .architecture import MAX_FEATURES

    out = {}
    for k, v in kwargs.items():
        if _size_int(v):
            out[k] = v
        elif isinstance(v, (list, tuple)) and 0 < len(v) <= 8 and all(_size_int(x) for x in v):
            out[k] = tuple(v)
        else:
            raise BrainsurgeonError(f"architecture {arch!r}: kwarg {k!r} must be an integer in [1, {MAX_FEATURES}] "
                                    f"or a list of up to 8 such integers, got {str(v)[:100]!r}")
    if isinstance(out.get("blocks"), int) and out["blocks"] > MAX_BLOCKS:
        raise BrainsurgeonError(f"architecture {arch!r}: blocks={out['blocks']} is more than {MAX_BLOCKS}")
    if "input_shape" in out and math.prod(out["input_shape"]) > MAX_INPUT:
        raise BrainsurgeonError(f"architecture {arch!r}: input_shape {out['input_shape']} has more than {MAX_INPUT} elements")
    return out


def check_spec(spec, factory: str | None = None) -> tuple[Callable[..., nn.Module], dict]:
    """Validate ``spec`` as data; returns ``(constructor, kwargs)`` without building anything.

    A ``factory`` spec is resolved (imported) only when ``factory`` names that same factory: a spec
    alone never imports or calls anything outside brainsurgeon's reference architectures.
    """
    if not isinstance(spec, dict):
        raise BrainsurgeonError(f"a model spec must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise BrainsurgeonError(f"a model spec has only the keys {list(SPEC_KEYS)}; unknown {unknown}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BrainsurgeonError(f"a model spec's 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    if ("arch" in spec) == ("factory" in spec):
        raise BrainsurgeonError("a model spec needs either 'arch' (a reference model) or 'factory' ('pkg.module:fn'), not both")
    if spec.get("modules") is not None:
        _check_modules(spec["modules"])
    if "arch" in spec:
        if not isinstance(spec["arch"], str) or spec["arch"] not in ARCHITECTURES:
            raise BrainsurgeonError(f"unknown architecture {str(spec['arch'])[:100]!r}; choose one of {sorted(ARCHITECTURES)}")
        ctor, kwargs = ARCHITECTURES[spec["arch"]], _check_arch_kwargs(spec["arch"], kwargs)
    else:
        name = spec["factory"]
        if factory is None or name != factory:
            # the hint repeats the name only when it looks like a factory: a file's text stays inside repr()
            plain = isinstance(name, str) and re.fullmatch(r"[\w.]+:[\w.]+", name)
            raise BrainsurgeonError(
                f"the spec names the model factory {str(name)[:100]!r}, and a model file never runs code"
                + (f": if you trust that code, name it yourself (--factory {name}; Python: factory={name!r})" if plain else "")
                + (f" (you named {factory!r})" if factory is not None else "")
            )
        ctor = _resolve_factory(name)
    _check_signature(ctor, kwargs, spec.get("arch") or spec.get("factory"))
    return ctor, kwargs


def _check_modules(modules) -> None:
    from .architecture import check_description

    if not isinstance(modules, dict):
        raise BrainsurgeonError("the spec's 'modules' must map module names to descriptions")
    count = 0
    for name, desc in modules.items():
        if not isinstance(name, str) or not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
            raise BrainsurgeonError(f"the spec's 'modules' names {str(name)[:100]!r}, which is not a module path")
        count += _described(check_description(desc, f"module {name!r}"))
        if count > MAX_DESCRIBED:
            raise BrainsurgeonError(f"the spec's 'modules' describe more than {MAX_DESCRIBED} modules; the spec is damaged")


def _described(args: dict) -> int:
    """Modules in one checked description (a Sequential counts itself and its children)."""
    return 1 + sum(_described(c) for c in args.get("children", []))


def _check_signature(ctor: Callable, kwargs: dict, what: str) -> None:
    """Keyword arguments the constructor does not take are a one-line error, not a TypeError later."""
    try:
        sig = inspect.signature(ctor)
    except (TypeError, ValueError):
        return  # no introspectable signature (a C function): the call itself reports
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        takes = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise BrainsurgeonError(f"{what} cannot take the keyword arguments {sorted(kwargs)} ({e}); it takes {takes}") from e


def build_model(
    spec: dict, *, factory: str | None = None, expected: Mapping[str, tuple] | None = None,
    max_params: int | None = MAX_PARAMS, device: str = "cpu",
) -> nn.Module:
    """Build an (untrained) model from its spec, checked as data first (see the module docstring).

    ``factory``: the ``package.module:function`` the caller trusts; a spec naming another is refused.
    ``expected``: ``{state-dict name: (shape, dtype)}`` of the data the model will receive (a file's
    header): the model is refused, before any allocation, unless its state dict has exactly these
    names and shapes, and floating entries where the data is floating. Without ``expected`` the model
    may hold at most ``max_params`` elements (None: no bound). ``device="meta"`` returns the model
    without allocating. A user's factory that cannot build on the meta device is built directly and
    then checked the same way (it is code the caller trusts).
    """
    ctor, kwargs = check_spec(spec, factory)
    on_meta = _meta_build(ctor, kwargs, spec)
    if on_meta is not None:
        _check_size(on_meta, expected, max_params, spec)
        if device == "meta":
            return on_meta
    model = _call(ctor, kwargs, spec, device)
    if on_meta is None:
        _check_size(model, expected, max_params, spec)
    return model


def _call(ctor: Callable, kwargs: dict, spec: dict, device) -> nn.Module:
    from .architecture import apply_modules

    what = spec.get("arch") or spec.get("factory")
    with torch.device(device):
        try:
            model = ctor(**kwargs)
        except (TypeError, ValueError, IndexError, ZeroDivisionError, RuntimeError) as e:
            if "factory" in spec and not isinstance(e, (TypeError, ValueError)):
                raise  # an error inside the user's own code is theirs, with its traceback
            raise BrainsurgeonError(f"the spec cannot build {what!r} with kwargs {kwargs} ({e})") from e
        if not isinstance(model, nn.Module):
            raise BrainsurgeonError(f"model factory {what!r} returned {type(model).__name__}, not a torch.nn.Module")
        if spec.get("modules"):
            # the layers a structured pruning made smaller or replaced (see architecture.spec_of)
            apply_modules(model, spec["modules"])
    return model


def _meta_build(ctor: Callable, kwargs: dict, spec: dict) -> nn.Module | None:
    """The model on the meta device (shapes, no memory); None for a user's factory that cannot do that."""
    try:
        return _call(ctor, kwargs, spec, "meta")
    except BrainsurgeonError:
        raise
    except Exception:
        if "factory" in spec:
            return None  # trusted user code that needs real tensors while building (e.g. .item())
        raise


def _check_size(model: nn.Module, expected: Mapping[str, tuple] | None, max_params: int | None, spec: dict) -> None:
    state = model.state_dict(keep_vars=True)
    if expected is None:
        total = sum(t.numel() for t in state.values())
        if max_params is not None and total > max_params:
            raise BrainsurgeonError(
                f"the spec declares a model of {total:,} elements, more than the {max_params:,} a spec alone may "
                "declare; load it with its weights (the file's data bounds it), or pass max_params"
            )
        return
    missing, unexpected = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    wrong = [f"{k}: data {tuple(expected[k][0])} vs spec {tuple(state[k].shape)}"
             for k in state if k in expected and tuple(expected[k][0]) != tuple(state[k].shape)]
    kinds = [f"{k}: data {expected[k][1]} vs spec {state[k].dtype}" for k in state if k in expected
             and (expected[k][1].is_floating_point != state[k].dtype.is_floating_point
                  or (not state[k].dtype.is_floating_point and expected[k][1] != state[k].dtype))]
    if missing or unexpected or wrong or kinds:
        what = "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                       f"unexpected {unexpected[:5]}" if unexpected else "",
                                       f"shapes differ {wrong[:5]}" if wrong else "", f"dtypes differ {kinds[:5]}" if kinds else ""]))
        raise BrainsurgeonError(f"the weights do not fit the architecture {_short(spec)} ({what})")


def _short(spec: dict) -> str:
    text = str({k: v for k, v in spec.items() if k != "modules"})
    return text if len(text) <= 200 else text[:200] + "..."


def _resolve_factory(factory: str) -> Callable[..., nn.Module]:
    """Import the caller-named factory ``package.module:function`` (never called for a file's spec alone)."""
    if not isinstance(factory, str) or ":" not in factory:
        raise BrainsurgeonError(f"model factory {factory!r} must look like 'package.module:function'")
    mod_name, fn_name = factory.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise BrainsurgeonError(
            f"cannot import {mod_name!r} for model factory {factory!r}: {e} (is its directory on PYTHONPATH?)"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BrainsurgeonError(f"{mod_name!r} has no callable {fn_name!r} (model factory {factory!r})")
    return fn
