"""Reference models (LeNet-300-100, LeNet-5, a small ResNet, VGG-, MobileNet- and concat-style nets) and specs.

A *spec* is a JSON-able dict that rebuilds a model's architecture:
``{"arch": "lenet300", "kwargs": {...}}`` for a reference model, or
``{"factory": "package.module:function", "kwargs": {...}}`` for a user's model.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

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


def _jsonable(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def make_spec(arch: str, **kwargs) -> dict:
    if arch not in ARCHITECTURES:
        raise BrainsurgeonError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return {"arch": arch, "kwargs": _jsonable(kwargs)}


def build_model(spec: dict) -> nn.Module:
    """Build an (untrained) model from its spec."""
    if not isinstance(spec, dict):
        raise BrainsurgeonError(f"a model spec must be a dict, got {type(spec).__name__}")
    kwargs = dict(spec.get("kwargs") or {})
    for k in ("input_shape", "hidden", "widths"):
        if k in kwargs and isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])
    if "arch" in spec:
        if spec["arch"] not in ARCHITECTURES:
            raise BrainsurgeonError(f"unknown architecture {spec['arch']!r}; choose one of {sorted(ARCHITECTURES)}")
        model = ARCHITECTURES[spec["arch"]](**kwargs)
    elif "factory" in spec:
        model = _resolve_factory(spec["factory"])(**kwargs)
    else:
        raise BrainsurgeonError("a model spec needs either 'arch' (a reference model) or 'factory' ('pkg.module:fn')")
    if spec.get("modules"):
        # the layers a structured pruning made smaller or replaced (see architecture.spec_of)
        from .architecture import apply_modules

        apply_modules(model, spec["modules"])
    return model


def _resolve_factory(factory: str) -> Callable[..., nn.Module]:
    if not isinstance(factory, str) or ":" not in factory:
        raise BrainsurgeonError(f"model factory {factory!r} must look like 'package.module:function'")
    mod_name, fn_name = factory.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise BrainsurgeonError(f"cannot import {mod_name!r} for model factory {factory!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BrainsurgeonError(f"{mod_name!r} has no callable {fn_name!r} (model factory {factory!r})")
    return fn
