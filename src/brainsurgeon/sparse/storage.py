"""``bs.save`` / ``bs.load``: pruned models in one safetensors file, sparse or dense.

File layout (format version 3). Metadata, all strings:

* ``brainsurgeon.format``: ``brainsurgeon-sparse`` or ``brainsurgeon-dense``;
* ``brainsurgeon.format_version``: ``"3"``; a reader refuses a newer version and still reads 1 and 2;
* ``brainsurgeon.spec``: the architecture spec (JSON), when known (the key ``io.load_model`` reads);
* ``brainsurgeon.tensors``: per sparse-encoded entry its encoding, shape, dtype and decoding facts
  (JSON); an array without ``::`` in its name and not in the table is a dense entry, stored as is;
* ``brainsurgeon.checksum``: SHA-256 over every other metadata string and every stored array (name,
  dtype, shape, bytes), so a damaged or edited file is refused instead of loading wrong weights.
  (Version 1 listed dense entries in the table too, and its checksum covered the arrays only.)

Sparse files store each entry ``NAME`` as arrays ``NAME::PART`` (see :mod:`.formats`); since version
3 a float array may be stored as deflated byte planes (``NAME::values_packed`` /
``NAME::data_packed``, with a table entry saying how: :func:`.formats.pack_floats`). Dense files store
the plain state dict, so ``io.load_model`` and any safetensors reader can read them too.
Every header field is validated, and declared shapes are checked against the stored arrays' sizes
before a tensor of that shape is allocated. Nothing is ever unpickled.

A Hugging Face ``transformers`` model is saved as a directory instead (:mod:`.hf_dir`).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import BrainsurgeonError
from ..io import SPEC_KEY, TIED_KEY, _read_tied, atomic_path, model_from_state, untie
from . import formats

FORMAT_KEY = "brainsurgeon.format"
VERSION_KEY = "brainsurgeon.format_version"
TENSORS_KEY = "brainsurgeon.tensors"
CHECKSUM_KEY = "brainsurgeon.checksum"
FORMAT_VERSION = 3
FORMATS = {"sparse": "brainsurgeon-sparse", "dense": "brainsurgeon-dense"}
PART_SEP = "::"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


# ----------------------------------------------------------------------------- helpers
def _dtype_name(dt: torch.dtype) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in _DTYPES:
        raise BrainsurgeonError(f"tensors of dtype {dt} cannot be stored; convert the model to float32 first")
    return name


def _checksum(arrays: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 of the metadata (but the checksum itself; None: version 1, arrays only) and the arrays."""
    h = hashlib.sha256()
    for key in sorted(meta or {}):
        if key != CHECKSUM_KEY:
            h.update(f"{len(key)}:{key}={len(meta[key])}:{meta[key]}\n".encode())
    for key in sorted(arrays):
        t = arrays[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_spec(model: nn.Module, spec: dict | None) -> dict | None:
    """The spec given, else the one a loaded model carries (``model.brainsurgeon_spec``)."""
    return spec if spec is not None else getattr(model, "brainsurgeon_spec", None)


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with sparse modules (from ``to_sparse``) turned back into dense weights."""
    from .modules import SparseModule

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, SparseModule):
            prefix = f"{name}." if name else ""
            for k in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]:
                del state[k]
            state.update({prefix + k: v for k, v in module.dense_parameters().items()})
    return state


# ----------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | Path, format: str = "sparse", *, spec: dict | None = None,
         tokenizer=None, shard_bytes: int | None = None) -> dict:
    """Save ``model`` to one safetensors file; returns sizes (bytes, bytes per non-zero) and encodings.

    ``format="sparse"`` stores each weight in its smallest encoding (CSR, delta-coded, packed N:M or
    dense); ``format="dense"`` the plain state dict. The architecture spec comes from ``spec=`` or
    ``model.brainsurgeon_spec``; without one, :func:`load` needs a template ``model=``.

    A transformers model is saved as a directory instead (:mod:`.hf_dir`): config, sparse shards of
    at most ``shard_bytes`` dense bytes each, and ``tokenizer`` (or the tokenizer files of the
    directory the model was loaded from); ``format="dense"`` writes a plain ``save_pretrained`` one.
    """
    if format not in FORMATS:
        raise BrainsurgeonError(f"unknown storage format {format!r}; choose one of {sorted(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"bs.save needs a torch.nn.Module, got {type(model).__name__}")
    from . import hf_dir

    if hf_dir.is_hf_model(model):
        return hf_dir.save_dir(model, path, format=format, tokenizer=tokenizer,
                               shard_bytes=shard_bytes or hf_dir.SHARD_BYTES)
    if tokenizer is not None or shard_bytes is not None:
        raise BrainsurgeonError("tokenizer= and shard_bytes= apply to Hugging Face models only")
    if Path(path).is_dir():
        raise BrainsurgeonError(f"{path} is a directory, but this model is saved as one file: give a file path "
                                "such as model.safetensors (only Hugging Face models are saved as directories)")
    # a tied parameter (b.weight = a.weight) is stored once and listed under TIED_KEY
    state, tied = untie(dense_state(model))
    arrays, table, encodings = encode_state(state, format)
    from safetensors.torch import save_file

    extra = {TIED_KEY: json.dumps(tied)} if tied else None
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=file_metadata(arrays, table, format, model_spec(model, spec), extra))
    return size_report(state, Path(path).stat().st_size, encodings, format, packed_names(table))


def encode_state(state: dict[str, torch.Tensor], format: str) -> tuple[dict, dict, dict]:
    """The arrays to store, the tensor table (sparse entries only) and each entry's encoding."""
    arrays, table, encodings = {}, {}, {}
    for name, t in state.items():
        if PART_SEP in name:
            raise BrainsurgeonError(f"state-dict entry {name!r} contains {PART_SEP!r}, which the sparse format reserves")
        enc = formats.pack_floats(formats.encode_best(t, name)) if format == "sparse" else formats.encode_dense(t)
        encodings[name] = enc.encoding
        if enc.encoding == "dense" and "packed" not in enc.info:
            _dtype_name(t.dtype)
            arrays[name] = enc.parts["data"]
        else:
            table[name] = {"encoding": enc.encoding, "shape": list(enc.shape), "dtype": _dtype_name(t.dtype), **enc.info}
            arrays.update({f"{name}{PART_SEP}{p}": a.contiguous() for p, a in enc.parts.items()})
    return arrays, table, encodings


def file_metadata(arrays: dict, table: dict, format: str, spec: dict | None, extra: dict | None = None) -> dict[str, str]:
    """The header strings, the checksum (over all of them and the arrays) last."""
    meta = {FORMAT_KEY: FORMATS[format], VERSION_KEY: str(FORMAT_VERSION), TENSORS_KEY: json.dumps(table)}
    if spec is not None:
        meta[SPEC_KEY] = json.dumps(spec)
    meta.update(extra or {})
    meta[CHECKSUM_KEY] = _checksum(arrays, meta)
    return meta


def packed_names(table: dict) -> list[str]:
    """The entries whose float array is stored as deflated byte planes."""
    return [name for name, entry in table.items() if "packed" in entry]


def size_report(state: dict[str, torch.Tensor], file_bytes: int, encodings: dict[str, str], format: str,
                packed: list[str] = ()) -> dict:
    nonzeros = sum(int((t != 0).sum()) for t in state.values())
    dense_f32 = sum(t.numel() * 4 for t in state.values())
    return {
        "format": format,
        "bytes": file_bytes,
        "dense_float32_bytes": dense_f32,
        "ratio_to_dense": file_bytes / max(dense_f32, 1),
        "nonzeros": nonzeros,
        "bytes_per_nonzero": file_bytes / max(nonzeros, 1),
        "encodings": dict(encodings),
        "packed": list(packed),  # float arrays stored as deflated byte planes (lossless)
    }


# ----------------------------------------------------------------------------- load
def read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for truncated or garbled headers
        raise BrainsurgeonError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e


def _check_format(path: Path, meta: dict[str, str]) -> tuple[str, int]:
    fmt = meta.get(FORMAT_KEY)
    if fmt is None:
        return "plain", 0  # a plain state dict, e.g. written by `brainsurgeon train` (io.save_weights)
    if fmt not in FORMATS.values():
        raise BrainsurgeonError(f"{path} has unknown format {fmt!r}; brainsurgeon reads {sorted(FORMATS.values())}")
    try:
        version = int(meta.get(VERSION_KEY, ""))
    except ValueError:
        raise BrainsurgeonError(f"{path} has no valid format version ({meta.get(VERSION_KEY)!r}): the file is damaged") from None
    if version > FORMAT_VERSION:
        raise BrainsurgeonError(f"{path} has {fmt} version {version}, newer than this brainsurgeon reads "
                                f"({FORMAT_VERSION}); upgrade brainsurgeon")
    if version < 1:
        raise BrainsurgeonError(f"{path} has invalid format version {version}")
    return fmt, version


def _read_arrays(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise BrainsurgeonError(f"{path} could not be read (truncated or corrupted?): {e}") from e


def _decode_state(path: Path, arrays: dict[str, torch.Tensor], table: dict, version: int) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in arrays.items() if PART_SEP not in k and k not in table}  # dense entries
    owners = {k.split(PART_SEP, 1)[0] for k in arrays if PART_SEP in k}
    if owners - set(table):
        raise BrainsurgeonError(f"{path}: arrays {sorted(owners - set(table))[:3]} belong to no tensor in the header: "
                                "the file is damaged")
    for name, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("encoding"), str):
            raise BrainsurgeonError(f"{path}: the header entry for {name!r} is malformed: the file is damaged")
        try:
            shape, dtype, encoding = formats.check_shape(entry.get("shape")), _DTYPES[entry["dtype"]], entry["encoding"]
        except (KeyError, TypeError) as e:
            raise BrainsurgeonError(f"{path}: the header entry for {name!r} has no valid dtype ({e}): the file is damaged") from e
        except BrainsurgeonError as e:
            raise BrainsurgeonError(f"{path}: tensor {name!r}: {e}") from e
        if encoding != "dense" and not shape:
            raise BrainsurgeonError(f"{path}: tensor {name!r} is {encoding}-encoded but has no dimensions: the file is damaged")
        if encoding == "dense" and name in arrays:
            parts = {"data": arrays[name]}
        else:
            prefix = f"{name}{PART_SEP}"
            parts = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        info = {k: v for k, v in entry.items() if k not in ("encoding", "shape", "dtype")}
        try:
            state[name] = formats.decode(formats.Encoded(encoding, shape, dtype, parts, info, version))
        except BrainsurgeonError as e:
            raise BrainsurgeonError(f"{path}: tensor {name!r}: {e}") from e
        except (RuntimeError, IndexError, ValueError, TypeError, OverflowError) as e:
            raise BrainsurgeonError(f"{path}: tensor {name!r} cannot be decoded ({str(e).splitlines()[0][:200]}): "
                                    "the file is damaged") from e
    return state


def load_file_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The (dense) state dict and the architecture spec stored in a brainsurgeon file."""
    path = Path(path)
    if not path.is_file():
        raise BrainsurgeonError(f"model file {path} does not exist")
    state, meta = load_file_arrays(path)
    return state, (_parse_json(path, meta, SPEC_KEY) if SPEC_KEY in meta else None)


def load_file_arrays(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The decoded (dense) tensors of one file and its metadata, after the format and checksum checks."""
    meta = read_header(path)
    fmt, version = _check_format(path, meta)
    arrays = _read_arrays(path)
    if fmt == "plain":
        return arrays, meta
    if CHECKSUM_KEY not in meta or _checksum(arrays, meta if version >= 2 else None) != meta[CHECKSUM_KEY]:
        raise BrainsurgeonError(f"{path} fails its checksum: the file is corrupted; save the model again")
    table = _parse_json(path, meta, TENSORS_KEY)
    if not isinstance(table, dict):
        raise BrainsurgeonError(f"{path}: the tensor table is malformed: the file is damaged")
    return _decode_state(path, arrays, table, version), meta


def _parse_json(path: Path, meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise BrainsurgeonError(f"{path}: metadata {key!r} is missing or not JSON: the file is damaged") from e


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save` (or a plain safetensors state dict).

    Without ``model`` the architecture is rebuilt from the spec stored in the file. With ``model`` (a
    template of the same architecture) a copy of it receives the weights; the template is untouched.
    A template whose spec or parameter shapes differ from the file's is refused.
    """
    from . import hf_dir

    if Path(path).is_dir():
        return hf_dir.load_dir(path, model=model)
    state, spec = load_file_state(path)
    tied = _read_tied(path, read_header(Path(path)), state)
    full = {**state, **{alias: state[kept] for alias, kept in tied.items()}}
    if model is None:
        if spec is None:
            raise BrainsurgeonError(f"{path} carries no architecture spec: pass a template, bs.load(path, model=...)")
        # built on the meta device and checked against the file first; dtypes and ties as stored
        target = model_from_state(spec, full, tied=tied, source=str(path))
        target.brainsurgeon_spec = spec
        return target.eval()
    else:
        if not isinstance(model, nn.Module):
            raise BrainsurgeonError(f"model= must be a torch.nn.Module template, got {type(model).__name__}")
        template_spec = getattr(model, "brainsurgeon_spec", None)
        if spec is not None and template_spec is not None and template_spec != spec:
            raise BrainsurgeonError(f"{path} holds architecture {spec}, but the model given is {template_spec}; "
                                    "pass a template of the stored architecture, or no model")
        target = copy.deepcopy(model)
    _check_fits(path, target, full, spec)
    target.load_state_dict(full)
    if spec is not None:
        target.brainsurgeon_spec = spec
    return target.eval()


def _check_fits(path, model: nn.Module, state: dict[str, torch.Tensor], spec) -> None:
    """Refuse (clearly) a file whose entries do not match the model's names and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        what = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shapes differ {wrong[:5]}" if wrong else ""]))
        raise BrainsurgeonError(f"{path} does not match the model's architecture ({what}); the file was saved "
                                f"from {spec if spec is not None else 'a model without a spec'}: pass a matching template")
