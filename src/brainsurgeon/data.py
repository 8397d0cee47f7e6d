"""Data in: user batches, scikit-learn's digits, Fashion-MNIST idx files, and ``.npz``/``.safetensors``.

A "data" argument is either one ``(inputs, targets)`` tuple of tensors (split into batches here) or
any iterable of ``(inputs, targets)`` batches, a DataLoader included.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import BrainsurgeonError

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
Batch = tuple[torch.Tensor, torch.Tensor]


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise BrainsurgeonError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def is_tensor_pair(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data)
    )


def iter_batches(data, batch_size: int = 128) -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches from either accepted form of ``data``."""
    if is_tensor_pair(data):
        x, y = (_as_tensor(t, n) for t, n in zip(data, ("inputs", "targets")))
        if len(x) != len(y):
            raise BrainsurgeonError(f"inputs and targets differ in length ({len(x)} vs {len(y)})")
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise BrainsurgeonError(
            "data must be (inputs, targets) batches or one (inputs, targets) tuple; got a single tensor. "
            "Pass (x, y) so the loss can be computed"
        )
    if not isinstance(data, Iterable):
        raise BrainsurgeonError(
            f"data must be an iterable of (inputs, targets) batches or one (inputs, targets) tuple, "
            f"got {type(data).__name__}"
        )
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise BrainsurgeonError(
                f"batch {i} is a {type(batch).__name__}; each batch must be an (inputs, targets) pair"
            )
        yield _as_tensor(batch[0], "inputs"), _as_tensor(batch[1], "targets")


@dataclass
class Calibration:
    """A fixed, materialised set of calibration batches.

    ``num_samples=None`` takes all of the data; a number takes the first ``num_samples`` samples.
    ``given`` is how many samples the data held (None when an iterable was not read to its end),
    ``truncated`` whether some were left out: the report states both, never silently."""

    batches: list[Batch]
    given: int | None = None
    truncated: bool = False

    @classmethod
    def from_data(cls, data, num_samples: int | None = None, batch_size: int = 128) -> "Calibration":
        batches: list[Batch] = []
        seen, truncated = 0, False
        for x, y in iter_batches(data, batch_size):
            if num_samples is not None and seen >= num_samples:
                truncated = truncated or len(x) > 0  # more data than asked for: stop reading
                break
            if num_samples is not None and seen + len(x) > num_samples:
                x, y, truncated = x[: num_samples - seen], y[: num_samples - seen], True
            if len(x) == 0:
                continue
            batches.append((x, y))
            seen += len(x)
        if not batches:
            raise BrainsurgeonError("the data is empty: give at least one (inputs, targets) sample")
        given = len(data[0]) if is_tensor_pair(data) else (None if truncated else seen)
        return cls(batches, given=given, truncated=truncated)

    def summary(self) -> dict:
        """``{"used": ..., "given": ..., "truncated": ...}`` for the report."""
        return {"used": self.num_samples, "given": self.given, "truncated": self.truncated}

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def to(self, device) -> "Calibration":
        return Calibration([(x.to(device), y.to(device)) for x, y in self.batches], self.given, self.truncated)

    def inputs(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.batches])

    def targets(self) -> torch.Tensor:
        return torch.cat([y for _, y in self.batches])

    def __iter__(self):
        return iter(self.batches)


# ----------------------------------------------------------------------------- bundled data sets
@dataclass
class Dataset:
    """Train and test splits as tensors, inputs shaped (N, C, H, W) float32 in [0, 1]."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()).item()) + 1

    @property
    def train(self) -> Batch:
        return self.x_train, self.y_train

    @property
    def test(self) -> Batch:
        return self.x_test, self.y_test


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), padded to 1x8x8, split with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise BrainsurgeonError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise BrainsurgeonError(f"{path} is not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BrainsurgeonError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise BrainsurgeonError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the Debian package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass --data-dir"
    )


def fashion_mnist_available(root: str | Path = DEFAULT_FASHION_DIR) -> bool:
    root = Path(root)
    return all(
        (root / s).exists() or (root / (s + ".gz")).exists()
        for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )


def load_fashion_mnist(root: str | Path = DEFAULT_FASHION_DIR) -> Dataset:
    """Fashion-MNIST from its idx files (60k train, 10k test), inputs 1x28x28 in [0, 1]."""
    root = Path(root)
    def images(stem):
        return torch.from_numpy(_read_idx(_find_idx(root, stem)).copy()).float().div_(255.0).unsqueeze(1)

    def labels(stem):
        return torch.from_numpy(_read_idx(_find_idx(root, stem)).astype(np.int64))

    return Dataset(
        "fashion-mnist",
        images("train-images-idx3-ubyte"),
        labels("train-labels-idx1-ubyte"),
        images("t10k-images-idx3-ubyte"),
        labels("t10k-labels-idx1-ubyte"),
    )


def load_tensor_file(path: str | Path) -> Batch:
    """``x`` and ``y`` from a ``.npz`` (loaded without pickle) or ``.safetensors`` file."""
    path = Path(path)
    if not path.exists():
        raise BrainsurgeonError(f"data file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise BrainsurgeonError(f"{path} lacks arrays {sorted(missing)}; it must hold `x` and `y`")
            try:
                x, y = torch.from_numpy(f["x"].copy()), torch.from_numpy(f["y"].copy())
            except (ValueError, TypeError) as e:  # object arrays would need pickle, which is never used
                raise BrainsurgeonError(
                    f"{path}: `x` and `y` must be numeric arrays (saved without pickle): {e}"
                ) from e
    elif path.suffix == ".safetensors":
        from .io import load_state  # truncated or corrupted files are one-line errors

        t = load_state(path)
        missing = {"x", "y"} - set(t)
        if missing:
            raise BrainsurgeonError(f"{path} lacks tensors {sorted(missing)}; it must hold `x` and `y`")
        x, y = t["x"], t["y"]
    else:
        raise BrainsurgeonError(f"data file {path} must be .npz or .safetensors holding `x` and `y`")
    if x.is_floating_point():
        x = x.float()
    return x, y.long() if not y.is_floating_point() else y


def load_dataset(spec: str, data_dir: str | Path | None = None) -> Dataset:
    """A data set by name (``digits``, ``fashion-mnist``) or a file path (used as both splits' source:
    the last 20% becomes the test split)."""
    if spec == "digits":
        return load_digits()
    if spec in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(data_dir or DEFAULT_FASHION_DIR)
    p = Path(spec)
    if p.suffix in (".npz", ".safetensors"):
        x, y = load_tensor_file(p)
        n_test = max(1, len(x) // 5)
        return Dataset(p.stem, x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:])
    raise BrainsurgeonError(
        f"unknown data {spec!r}: use `digits`, `fashion-mnist`, or a .npz/.safetensors file holding x and y"
    )
