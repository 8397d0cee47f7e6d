"""Hugging Face ``transformers`` models as sparse directories: ``bs.save(hf_model, "dir/")`` / ``bs.load("dir/")``.

Layout of a sparse directory (format ``brainsurgeon-sparse-hf``, version 1)::

    config.json                         the model's config, as ``save_pretrained`` writes it
    generation_config.json              when the model has one
    tokenizer files                     copied from the model's source directory, or ``tokenizer=``
    model-00001-of-0000N.sparse.safetensors   brainsurgeon sparse files (:mod:`.storage`, version 3):
                                        each weight in its smallest encoding, checksummed over header and data
    brainsurgeon-sparse.json            the index: format, version, shard -> SHA-256, tensor -> shard,
                                        tied tensors (stored once), SHA-256 of config.json, and a
                                        checksum over the index itself

Loading builds the model from ``config.json`` alone: ``model_type`` must name a configuration class
of transformers and ``architectures[0]`` a model class of transformers for it. ``auto_map`` and
``trust_remote_code`` are never used, so no code a file names is imported. Declared shapes are
compared with the architecture's (built on the meta device: nothing allocated) and each tensor's
data is checked against its declared size before decoding (:mod:`.formats`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import BrainsurgeonError

INDEX_FILE = "brainsurgeon-sparse.json"
DIR_FORMAT = "brainsurgeon-sparse-hf"
DIR_VERSION = 1
SHARD_BYTES = 2 * 1024**3  # dense bytes per shard before a new one starts (as save_pretrained's default)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def is_hf_model(model) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers when it is not loaded)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _index_checksum(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False):
    """Yield a fresh temporary directory beside ``path``; on success it becomes ``path``.

    ``path`` may not exist yet or be an empty directory; anything else is refused unless ``replace``
    (then the old directory is removed only after the new one is complete).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BrainsurgeonError(f"{path} is a file; a Hugging Face model is saved as a directory: give a directory path")
    if path.exists() and any(path.iterdir()) and not replace:
        raise BrainsurgeonError(f"{path} exists and is not an empty directory; give a new directory path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "d")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tied_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """State entries that share storage with an earlier one (tied embeddings): alias -> stored name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    aliases = {}
    for name in state:
        p = params.get(name)
        if p is None:
            continue
        key = p.data_ptr()
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _copy_tokenizer(model: nn.Module, tokenizer, out: Path) -> list[str]:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    copied = []
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
                copied.append(name)
    return copied


def save_dir(model: nn.Module, path: str | Path, format: str = "sparse", *, tokenizer=None,
             shard_bytes: int = SHARD_BYTES, replace: bool = False) -> dict:
    """Save a transformers model as a sparse directory (``format="sparse"``) or a plain one (``"dense"``)."""
    from safetensors.torch import save_file

    from . import storage

    if format == "dense":
        return export_dense(model, path, tokenizer=tokenizer, replace=replace)
    state = storage.dense_state(model)
    aliases = _tied_aliases(model, state)
    for alias in aliases:
        del state[alias]
    with atomic_dir(path, replace) as tmp:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]  # as save_pretrained records it: load builds this class
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        shards = _split(state, shard_bytes)
        index = {"format": DIR_FORMAT, "format_version": DIR_VERSION, "shards": {}, "weight_map": {},
                 "aliases": aliases, "config_sha256": _sha256_file(tmp / "config.json")}
        encodings, packed, file_bytes = {}, [], 0
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.sparse.safetensors"
            arrays, table, enc = storage.encode_state({n: state[n] for n in names}, "sparse")
            save_file(arrays, str(tmp / fname), metadata=storage.file_metadata(arrays, table, "sparse", None))
            index["shards"][fname] = _sha256_file(tmp / fname)
            index["weight_map"].update({n: fname for n in names})
            encodings.update(enc)
            packed += storage.packed_names(table)
            file_bytes += (tmp / fname).stat().st_size
        index["tokenizer_files"] = _copy_tokenizer(model, tokenizer, tmp)
        # heads and FFN neurons removed per layer (structure="channel"): the config keeps the dense
        # counts, so the per-layer shapes travel in the (checksummed) index
        index["layer_structure"] = _layer_structure(model)
        index["checksum"] = _index_checksum(index)
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        total = sum(p.stat().st_size for p in tmp.iterdir())
    report = storage.size_report(state, file_bytes, encodings, "sparse", packed)
    report.update(directory=str(path), directory_bytes=total, shards=len(shards), tied=aliases)
    return report


def _split(state: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current or not shards else shards


def export_dense(model_or_path, out: str | Path, *, tokenizer=None, replace: bool = False) -> dict:
    """Write a plain ``save_pretrained`` directory (float weights as they are) of a model or a sparse directory.

    Sparse modules from ``to_sparse`` are turned back into dense layers first; the model is not modified.
    """
    from .onnx import to_dense

    model = load_dir(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    if not is_hf_model(model):
        raise BrainsurgeonError("export_dense writes Hugging Face directories: give a transformers model or a sparse "
                                "directory saved by bs.save")
    dense = to_dense(model)
    with atomic_dir(out, replace) as tmp:
        dense.save_pretrained(str(tmp))
        copied = _copy_tokenizer(model, tokenizer, tmp)
        total = sum(p.stat().st_size for p in tmp.iterdir())
    return {"directory": str(out), "directory_bytes": total, "tokenizer_files": copied}


# ----------------------------------------------------------------------------- load
def _read_index(path: Path) -> dict:
    f = path / INDEX_FILE
    if not f.is_file():
        raise BrainsurgeonError(f"{path} is a directory without {INDEX_FILE}: not a brainsurgeon sparse directory "
                                "(a plain Hugging Face directory loads with transformers' from_pretrained)")
    try:
        index = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BrainsurgeonError(f"{f} is not valid JSON ({e}): the directory is damaged") from e
    if not isinstance(index, dict) or index.get("format") != DIR_FORMAT:
        raise BrainsurgeonError(f"{f} is not a {DIR_FORMAT} index: the directory is damaged")
    version = index.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BrainsurgeonError(f"{f} has no valid format version ({version!r}): the directory is damaged")
    if version > DIR_VERSION:
        raise BrainsurgeonError(f"{path} is {DIR_FORMAT} version {version}, newer than this brainsurgeon reads "
                                f"({DIR_VERSION}); upgrade brainsurgeon")
    if index.get("checksum") != _index_checksum(index):
        raise BrainsurgeonError(f"{f} fails its checksum: the index was edited or damaged; save the model again")
    for key, kind in (("shards", dict), ("weight_map", dict), ("aliases", dict), ("config_sha256", str)):
        if not isinstance(index.get(key), kind):
            raise BrainsurgeonError(f"{f}: {key!r} is missing or malformed: the directory is damaged")
    return index


def build_from_config(config_path: Path):
    """``(model class, config, skeleton)`` for a ``config.json``; the skeleton is on the meta device.

    Only transformers' own classes: ``model_type`` picks the configuration class and
    ``architectures[0]`` must be a transformers model class taking that configuration.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BrainsurgeonError(f"{config_path} is missing or not JSON ({e})") from e
    model_type, archs = raw.get("model_type"), raw.get("architectures")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise BrainsurgeonError(f"{config_path}: model_type {model_type!r} is not a transformers architecture "
                                "(custom code is never loaded)")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise BrainsurgeonError(f"{config_path} names no architecture (\"architectures\": [...])")
    config_cls = CONFIG_MAPPING[model_type]
    cls = getattr(transformers, archs[0], None) if archs[0].isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and issubclass(config_cls, cls.config_class)):
        raise BrainsurgeonError(f"{config_path}: architecture {archs[0]!r} is not a transformers model class for "
                                f"model_type {model_type!r} (custom code is never loaded)")
    config = config_cls.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    with torch.device("meta"):
        skeleton = cls(config)  # shapes only, nothing allocated
    return cls, config, skeleton


def load_dir(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a directory written by :func:`save_dir`: the transformers model, weights bit-identical."""
    from transformers.initialization import no_init_weights

    from . import storage

    path = Path(path)
    if model is not None:
        raise BrainsurgeonError("a sparse directory rebuilds its model from config.json: call bs.load(path) without model=")
    index = _read_index(path)
    if _sha256_file(path / "config.json") != index["config_sha256"]:
        raise BrainsurgeonError(f"{path / 'config.json'} does not match the checksum in {INDEX_FILE}: it was edited or damaged")
    cls, config, skeleton = build_from_config(path / "config.json")
    structure = index.get("layer_structure")
    if structure is not None:
        _apply_layer_structure(skeleton, structure)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    _check_declared(path, index, expected)
    state = {}
    for fname, digest in index["shards"].items():
        f = path / fname
        if Path(fname).name != fname or not f.is_file():
            raise BrainsurgeonError(f"{path}: shard {fname!r} is missing")
        if _sha256_file(f) != digest:
            raise BrainsurgeonError(f"{f} fails its checksum: the shard is damaged; save the model again")
        _check_shard_header(f, expected)  # declared shapes = the architecture's, before decoding
        tensors, _ = storage.load_file_arrays(f)
        state.update(tensors)
    for alias, source in index["aliases"].items():
        state[alias] = state[source]
    _check_state(path, state, expected)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    with no_init_weights():
        net = cls(config)
    net.tie_weights()  # no_init_weights also skips tying (tied embeddings)
    if structure is not None:
        _apply_layer_structure(net, structure)
    if len(dtypes) == 1:
        net = net.to(dtypes.pop())  # as stored (float32, bfloat16, ...), so the weights stay bit-identical
    net.load_state_dict(state, strict=True)
    net.name_or_path = str(path)  # so a later save or export_dense finds the tokenizer files here
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        net.generation_config = GenerationConfig.from_pretrained(str(path))
    return net.eval()


def _layer_structure(model: nn.Module) -> dict | None:
    """The per-layer head counts and FFN widths, when they differ from what the config describes."""
    from ..structured.transformer import layer_structure

    try:
        structure = layer_structure(model)
    except BrainsurgeonError:  # a family whose layout the adapter does not know: dense per its config
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():  # what the config alone describes, without weights
        dense = layer_structure(type(model)(model.config))
    return None if structure == dense else structure


def _apply_layer_structure(model: nn.Module, structure) -> None:
    from ..structured.transformer import apply_layer_structure

    if not isinstance(structure, dict):
        raise BrainsurgeonError(f"{INDEX_FILE}: layer_structure must be a JSON object: the directory is damaged")
    try:
        apply_layer_structure(model, structure)
    except (KeyError, TypeError, ValueError) as e:
        raise BrainsurgeonError(f"{INDEX_FILE}: layer_structure does not fit the config ({e}): the directory is damaged") from e


def _check_declared(path: Path, index: dict, expected: dict) -> None:
    """The index's tensors are exactly the architecture's, in shards that exist (before reading data)."""
    declared = set(index["weight_map"]) | set(index["aliases"])
    if declared != set(expected):
        missing, extra = sorted(set(expected) - declared), sorted(declared - set(expected))
        raise BrainsurgeonError(f"{path}: the stored tensors do not match the architecture in config.json "
                                f"(missing {missing[:3]}, unexpected {extra[:3]})")
    if set(index["weight_map"].values()) - set(index["shards"]) or not set(index["aliases"].values()) <= set(index["weight_map"]):
        raise BrainsurgeonError(f"{path}: {INDEX_FILE} refers to shards or tensors it does not hold: the directory is damaged")


def _check_shard_header(f: Path, expected: dict) -> None:
    """Every tensor a shard declares (sparse table or dense array) has the architecture's shape."""
    from safetensors import safe_open

    from . import storage

    meta = storage.read_header(f)
    table = storage._parse_json(f, meta, storage.TENSORS_KEY)
    if not isinstance(table, dict):
        raise BrainsurgeonError(f"{f}: the tensor table is malformed: the shard is damaged")
    declared = {k: (e.get("shape") if isinstance(e, dict) else None) for k, e in table.items()}
    with safe_open(str(f), "pt") as h:
        declared.update({k: list(h.get_slice(k).get_shape()) for k in h.keys() if storage.PART_SEP not in k})
    wrong = [k for k, shape in declared.items() if k not in expected or shape != list(expected[k])]
    if wrong:
        raise BrainsurgeonError(f"{f}: tensors {wrong[:3]} are not in config.json's architecture or have other shapes")


def _check_state(path: Path, state: dict, expected: dict) -> None:
    if set(state) != set(expected):
        raise BrainsurgeonError(f"{path}: the shards hold {sorted(set(state) ^ set(expected))[:3]} contrary to the index")
    wrong = [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise BrainsurgeonError(f"{path}: stored tensors differ from config.json's architecture: {wrong[:3]}")


def load_any(path: Path) -> nn.Module:
    """A sparse directory (bs.load), or a plain ``save_pretrained`` directory with safetensors weights.

    A plain directory's ``config.json`` passes the same checks (transformers classes only, no remote code).
    """
    if (path / INDEX_FILE).is_file():
        return load_dir(path)
    cls, _, _ = build_from_config(path / "config.json")
    try:
        return cls.from_pretrained(str(path), use_safetensors=True, local_files_only=True, trust_remote_code=False).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise BrainsurgeonError(f"{path}: the Hugging Face directory could not be loaded ({str(e).splitlines()[0][:200]})") from e


def export_directory(model_dir: Path, out: Path, format: str, force: bool) -> tuple[dict, list[str]]:
    """``brainsurgeon export`` for a Hugging Face directory: the report and the lines to print."""
    from .onnx import export_hf_onnx

    if Path(out).resolve() == Path(model_dir).resolve() or Path(model_dir).resolve() in Path(out).resolve().parents:
        raise BrainsurgeonError("--out must be outside --model (the input is never overwritten)")
    if Path(out).exists() and not force:
        raise BrainsurgeonError(f"--out {out} exists; pass --force to overwrite it")
    model = load_any(Path(model_dir))
    if format == "onnx":
        report = export_hf_onnx(model, out)
        return report, [f"wrote {out} (ONNX opset {report['opset']}, {report['bytes'] / 2**20:.1f} MiB: one step of "
                        "the causal LM with its KV cache as inputs/outputs)",
                        "onnxruntime matches PyTorch: max |diff| " + ", ".join(
                            f"{k} {v:.2e}" for k, v in report["max_abs_diff_per_phase"].items())]
    if format == "dense":
        report = export_dense(model, out, replace=force)
        return report, [f"wrote {out} (plain save_pretrained directory, {report['directory_bytes'] / 2**20:.1f} MiB)"]
    report = save_dir(model, out, replace=force)
    return report, [f"wrote {out} (sparse Hugging Face directory, {report['directory_bytes'] / 2**20:.1f} MiB in all; "
                    f"weights {report['bytes'] / 2**20:.1f} MiB = {100 * report['ratio_to_dense']:.1f}% of float32)",
                    f"{report['nonzeros']} non-zeros, {report['bytes_per_nonzero']:.2f} bytes per non-zero"]
