"""Files: atomic writes, and models as safetensors with their architecture spec in the metadata.

Nothing is ever unpickled: weights are safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import BrainsurgeonError
from .models import build_model

SPEC_KEY = "brainsurgeon.spec"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_weights(model: nn.Module, path: str | Path, spec: dict | None = None, extra: dict | None = None) -> None:
    """Save ``model.state_dict()`` as safetensors (atomically), with ``spec`` in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {}
    if spec is not None:
        meta[SPEC_KEY] = json.dumps(spec)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_spec(path: str | Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for missing files and corrupt headers
        raise BrainsurgeonError(f"{path} is not a readable safetensors file: {e}") from e
    return json.loads(meta[SPEC_KEY]) if SPEC_KEY in meta else None


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file with ``weights_only=True`` (never unpickled)."""
    path = Path(path)
    if not path.exists():
        raise BrainsurgeonError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own types for corrupt headers
            raise BrainsurgeonError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BrainsurgeonError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({e}); "
            "save plain state_dicts or use safetensors"
        ) from e
    if not isinstance(state, dict):
        raise BrainsurgeonError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    return state


def load_model(weights: str | Path, spec: dict | None = None) -> nn.Module:
    """Rebuild a model from ``spec`` (or the spec stored in the safetensors file) and load weights."""
    weights = Path(weights)
    if not weights.exists():
        raise BrainsurgeonError(f"weights file {weights} does not exist")
    if spec is None:
        if weights.suffix != ".safetensors":
            raise BrainsurgeonError(f"{weights} carries no architecture spec: give --model package.module:factory")
        spec = read_spec(weights)
        if spec is None:
            raise BrainsurgeonError(f"{weights} carries no architecture spec: give --model package.module:factory")
    model = build_model(spec)
    state = load_state(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise BrainsurgeonError(f"weights in {weights} do not fit the architecture {spec}: {e}") from e
    model.brainsurgeon_spec = spec  # so later saves can keep the spec
    return model
