"""Shared set-up for the benchmarks: the dense reference models, trained once and cached under runs/."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from brainsurgeon.data import fashion_mnist_available, load_digits, load_fashion_mnist  # noqa: E402
from brainsurgeon.evaluate import evaluate  # noqa: E402
from brainsurgeon.io import load_model, save_weights  # noqa: E402
from brainsurgeon.models import build_model, make_spec  # noqa: E402
from brainsurgeon.train import train_model  # noqa: E402

CACHE = ROOT / "runs" / "bench"


def dataset(name: str = "fashion-mnist"):
    if name == "fashion-mnist" and not fashion_mnist_available():
        raise SystemExit(
            "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist: "
            "apt-get install dataset-fashion-mnist (the benchmarks are defined on it)"
        )
    return load_fashion_mnist() if name == "fashion-mnist" else load_digits()


def dense_model(arch: str, data, epochs: int, lr: float = 1e-3, seed: int = 0, **arch_kwargs):
    """Train (or load from the cache) the dense reference model; returns (model, seconds, cached).
    ``arch_kwargs``: options of the architecture (e.g. ``widths``), part of the cache key."""
    tag = "".join(f"_{k}{'-'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in sorted(arch_kwargs.items()))
    path = CACHE / f"{arch}{tag}_{data.name}_e{epochs}_s{seed}.safetensors"
    if path.exists():
        return load_model(path), 0.0, True
    torch.manual_seed(seed)
    spec = make_spec(arch, input_shape=data.input_shape, num_classes=data.num_classes, **arch_kwargs)
    model = build_model(spec)
    t0 = time.perf_counter()
    train_model(model, data.train, epochs=epochs, lr=lr, seed=seed)
    seconds = time.perf_counter() - t0
    save_weights(model, path, spec)
    model.brainsurgeon_spec = spec
    return model, seconds, False


def calibration(data, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    return data.x_train[idx], data.y_train[idx]


def accuracy(model, data) -> float:
    return evaluate(model, data.test)["accuracy"]
