"""Files: atomic writes, and models as safetensors with their architecture spec in the metadata.

Files are data. Nothing is ever unpickled (weights are safetensors, or ``torch.load(weights_only=True)``),
and nothing a file names is imported or called: the spec in a file is validated as data by
:func:`.models.check_spec`, and a spec naming a ``factory`` is refused unless the caller names the same
factory (``factory=``; ``--factory`` on the command line). The model is built on the ``meta`` device
and compared with the shapes and dtypes of the file's tensors before any memory is allocated.

Dense weights files written by :func:`save_weights` (version 2) hold, in the safetensors metadata:

* ``brainsurgeon.spec``: the architecture spec (JSON);
* ``brainsurgeon.tied``: ``{alias: stored name}`` for parameters that share memory (``b.weight =
  a.weight``): stored once, tied again on loading;
* ``brainsurgeon.weights_version``: ``"2"``; a newer version is refused;
* ``brainsurgeon.weights_checksum``: SHA-256 over every metadata entry (spec included) and every
  tensor (name, dtype, shape, bytes), so a damaged file or an edited spec is refused.

Files without ``brainsurgeon.weights_version`` (written before version 2, or by other tools) carry no
checksum: they load the old way, with the same validation of the spec and of the shapes.
Tensors keep their dtype: a float64, float16 or bfloat16 model comes back in that dtype.
"""
from __future__ import annotations

import hashlib
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
TIED_KEY = "brainsurgeon.tied"
VERSION_KEY = "brainsurgeon.weights_version"
CHECKSUM_KEY = "brainsurgeon.weights_checksum"
WEIGHTS_VERSION = 2
_STORAGE_FORMAT_KEY = "brainsurgeon.format"  # files of bs.save (sparse/storage.py), decoded there


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    if path.is_dir():
        raise BrainsurgeonError(f"{path} is a directory; give a file path to write (e.g. {path / 'model.safetensors'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        from .outputs import default_mode

        os.chmod(tmp, default_mode())  # mkstemp makes 0600; an output gets open()'s mode (0644 under umask 022)
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


# ----------------------------------------------------------------------------- save
def untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store shared tensors once: ``(arrays, {alias: stored name})``.

    Entries that are the same memory (same storage, offset, shape, strides and dtype: tied parameters)
    are stored under their first name; any other overlap (one a view into another) is copied, as
    safetensors stores no views.
    """
    arrays: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        shares = t.numel() and ptr in storages
        arrays[name] = t.clone().contiguous() if shares or not t.is_contiguous() else t
        if t.numel():
            seen[key] = name
            storages.add(ptr)
    return arrays, tied


def checksum(arrays: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over the metadata (all but the checksum itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(arrays):
        t = arrays[name].contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a bytes copy
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | Path, spec: dict | None = None, extra: dict | None = None) -> None:
    """Save ``model.state_dict()`` as safetensors (atomically, in its dtypes), with ``spec`` in the metadata.

    Tied parameters are stored once (see :func:`untie`); the metadata and the tensors are covered by a
    checksum (see the module docstring).
    """
    from safetensors.torch import save_file

    arrays, tied = untie(model.state_dict())
    meta = {VERSION_KEY: str(WEIGHTS_VERSION)}
    if spec is not None:
        meta[SPEC_KEY] = json.dumps(spec)
    if tied:
        meta[TIED_KEY] = json.dumps(tied)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    meta[CHECKSUM_KEY] = checksum(arrays, meta)
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


# ----------------------------------------------------------------------------- read
def read_header(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (one-line error for a missing, truncated or garbled file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for missing files and corrupt headers
        raise BrainsurgeonError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e


def _json_entry(path, meta: dict[str, str], key: str):
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise BrainsurgeonError(f"{path}: metadata {key!r} is not valid JSON ({e}): the file is damaged") from e


def read_spec(path: str | Path) -> dict | None:
    """The architecture spec stored in a safetensors file (data: nothing is built or imported), or None."""
    meta = read_header(path)
    if SPEC_KEY not in meta:
        return None
    spec = _json_entry(path, meta, SPEC_KEY)
    if not isinstance(spec, dict):
        raise BrainsurgeonError(f"{path}: the architecture spec must be a JSON object, got {type(spec).__name__}")
    return spec


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Arrays and metadata, verified (version, checksum). safetensors checks every tensor's declared
    extent against the file's length, so reading allocates no more than the file holds."""
    from safetensors.torch import load_file

    meta = read_header(path)
    if _STORAGE_FORMAT_KEY in meta:
        from .sparse.storage import load_file_state  # a bs.save file: its own format, version and checksum

        return load_file_state(path)[0], meta
    try:
        arrays = load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated data
        raise BrainsurgeonError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if VERSION_KEY in meta:
        if meta[VERSION_KEY] != str(WEIGHTS_VERSION):
            raise BrainsurgeonError(f"{path} has weights version {meta[VERSION_KEY][:20]!r}; this brainsurgeon reads "
                                    f"version {WEIGHTS_VERSION} (upgrade brainsurgeon for newer files)")
        if meta.get(CHECKSUM_KEY) != checksum(arrays, meta):
            raise BrainsurgeonError(f"{path} fails its checksum (tensors or metadata changed): the file is damaged; save the model again")
    return arrays, meta


def _read_tied(path, meta: dict[str, str], arrays: dict) -> dict[str, str]:
    tied = _json_entry(path, meta, TIED_KEY) if TIED_KEY in meta else {}
    if not isinstance(tied, dict) or not all(isinstance(a, str) and isinstance(k, str) and k in arrays and a not in arrays
                                             for a, k in tied.items()):
        raise BrainsurgeonError(f"{path}: metadata {TIED_KEY!r} must map names not stored to stored tensors: the file is damaged")
    return tied


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors (tied entries under every name), or from a torch file with
    ``weights_only=True`` (never unpickled)."""
    return _load_state(Path(path))[0]


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """``(state, tied, metadata)``: ``state`` holds every name, aliases share their stored tensor."""
    if not path.is_file():
        raise BrainsurgeonError(f"weights file {path} " + ("is a directory; give the weights file in it" if path.is_dir()
                                                            else "does not exist"))
    if path.suffix == ".safetensors":
        arrays, meta = _read_safetensors(path)
        tied = _read_tied(path, meta, arrays)
        return {**arrays, **{a: arrays[k] for a, k in tied.items()}}, tied, meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BrainsurgeonError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({e}); "
            "save plain state_dicts or use safetensors"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BrainsurgeonError(f"{path} does not hold a state_dict of tensors (found {type(state).__name__})")
    return state, {}, {}


# ----------------------------------------------------------------------------- models
def load_model(
    weights: str | Path, spec: dict | None = None, *, factory: str | None = None, factory_kwargs: dict | None = None,
) -> nn.Module:
    """Rebuild a model from its spec and load its weights (in their dtypes, ties restored).

    ``spec``: the caller's own spec (trusted, a ``factory`` in it included). Otherwise the spec stored in
    the safetensors file is used, as data: a stored ``factory`` spec is refused unless ``factory`` names
    the same ``package.module:function``. ``factory`` (with ``factory_kwargs``, a dict) also rebuilds a
    file without a spec or a torch file; given without ``factory_kwargs`` for a file whose spec names
    that factory, the file's kwargs (and changed modules) are used. The architecture is checked against
    the file's tensors on the meta device before anything is allocated.
    """
    weights = Path(weights)
    state, tied, meta = _load_state(weights)
    spec, trusted = _choose_spec(weights, meta, spec, factory, factory_kwargs)
    model = model_from_state(spec, state, factory=trusted, tied=tied, source=str(weights))
    model.brainsurgeon_spec = spec  # so later saves can keep the spec
    return model


def _choose_spec(path: Path, meta: dict, spec, factory: str | None, factory_kwargs) -> tuple[dict, str | None]:
    """``(spec, the factory the caller trusts)`` from the caller's arguments and the file's stored spec."""
    if spec is not None:
        if factory is not None or factory_kwargs is not None:
            raise BrainsurgeonError("give either spec= or factory= (with factory_kwargs=), not both")
        return spec, spec.get("factory") if isinstance(spec, dict) else None
    if factory_kwargs is not None and not isinstance(factory_kwargs, dict):
        raise BrainsurgeonError(f"factory kwargs must be a mapping of keyword arguments, got {type(factory_kwargs).__name__}")
    stored = _json_entry(path, meta, SPEC_KEY) if SPEC_KEY in meta else None
    if stored is not None and not isinstance(stored, dict):
        raise BrainsurgeonError(f"{path}: the architecture spec must be a JSON object, got {type(stored).__name__}")
    if factory is None:
        if factory_kwargs is not None:
            raise BrainsurgeonError("factory kwargs need a factory: --factory package.module:function (Python: factory=)")
        if stored is None:
            raise BrainsurgeonError(f"{path} carries no architecture spec: give --factory package.module:function "
                                    "(Python: factory='package.module:function')")
        return stored, None
    if stored is not None and stored.get("factory") == factory:
        return (stored if factory_kwargs is None else {**stored, "kwargs": factory_kwargs}), factory
    return {"factory": factory, "kwargs": dict(factory_kwargs or {})}, factory


def model_from_state(
    spec: dict, state: dict[str, torch.Tensor], *, factory: str | None = None, tied: dict[str, str] | None = None,
    source: str = "the weights",
) -> nn.Module:
    """The model of ``spec`` holding ``state`` (every name present; ``tied`` aliases share a tensor).

    The spec is checked as data and the model compared with the state's names, shapes and dtypes on
    the meta device before it is built (:func:`.models.build_model` with ``expected``). Floating
    tensors keep the state's dtype; ``tied`` entries, and parameters the architecture itself ties,
    end up as one parameter.
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    try:
        model = build_model(spec, factory=factory, expected=expected)
    except BrainsurgeonError as e:
        raise BrainsurgeonError(f"{source}: {e}") from e
    ties = {**{a: k for a, k in own_ties(model).items() if a in state and k in state}, **(tied or {})}
    for alias, kept in ties.items():
        if state[alias] is not state[kept] and not torch.equal(state[alias], state[kept]):
            raise BrainsurgeonError(f"{source}: {alias} and {kept} are one parameter in the architecture, but the file "
                                    "holds different values for them: the file does not belong to this architecture")
    try:
        model.load_state_dict(state, assign=True)  # assign: the file's tensors (and dtypes) become the parameters
    except RuntimeError as e:
        raise BrainsurgeonError(f"weights in {source} do not fit the architecture: {e}") from e
    for alias, kept in ties.items():
        _tie(model, alias, kept, source)
    return model


def own_ties(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` of parameters and buffers the architecture registers under several names."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) in first:
            ties[name] = first[id(t)]
        else:
            first[id(t)] = name
    return ties


def _tie(model: nn.Module, alias: str, kept: str, source: str) -> None:
    (owner_a, _, leaf_a), (owner_k, _, leaf_k) = alias.rpartition("."), kept.rpartition(".")
    a, k = model.get_submodule(owner_a), model.get_submodule(owner_k)
    for registry in ("_parameters", "_buffers"):
        if leaf_a in getattr(a, registry) and leaf_k in getattr(k, registry):
            getattr(a, registry)[leaf_a] = getattr(k, registry)[leaf_k]
            return
    raise BrainsurgeonError(f"{source}: cannot tie {alias} to {kept} (one is a parameter, the other a buffer): the file is damaged")
