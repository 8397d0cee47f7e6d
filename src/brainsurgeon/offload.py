"""Models larger than memory: prune an HF safetensors directory block by block (``offload="disk"``).

The layer-wise methods (SparseGPT, Wanda, OBC, magnitude) need, at any time, one transformer block
and the activations flowing into it (:mod:`brainsurgeon.sequential`). Out of core:

1. the model is built from ``config.json`` with every parameter on the ``meta`` device
   (``accelerate.init_empty_weights``: no weight memory; buffers such as RoPE frequencies are real);
   every parameter's name, shape and dtype is checked against the shards' safetensors headers
   before anything is read (:class:`ShardIndex`);
2. the embeddings are loaded, the first block's inputs captured, and the embeddings released;
3. for each block (:class:`DiskHooks`): its tensors are read from the shards, the block is pruned,
   its outputs computed for the next block, its pruned tensors written to the output directory's
   shard for that block, and released back to ``meta``;
4. the remaining tensors (embeddings, final norm, an untied head) are copied tensor by tensor, and
   the index, config and tokenizer files written.

Peak memory is one block's weights, its statistics (H = 2XX^T/N per input group, float64) and the
cached activations, which ``offload_activations=True`` moves to memory-mapped files on disk. With
glibc, large buffers are mapped on their own and the heap is trimmed after each block (a
process-wide allocator setting, see :class:`_Glibc`), so that freed blocks really leave.

The output is written into ``.NAME.partial`` beside the target and renamed when complete. After
every block a ``state.json`` records the finished blocks; ``resume=True`` continues an interrupted
run from the last finished block: the finished blocks are read back (already pruned) and only
advance the activations, so the result is identical to an uninterrupted run (tested bit for bit).

Only uniform and N:M allocations run out of core: a global or OWL allocation keeps a score per
weight of the whole model in memory, which is what out-of-core pruning exists to avoid.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import BrainsurgeonError
from .memory import LIBC as _LIBC
from .sequential import BlockHooks

FORMAT = "brainsurgeon-offload/1"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: the files of an HF directory besides the weights that are copied to the output
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
             "chat_template.jinja", "added_tokens.json")


# ----------------------------------------------------------------------------- reading the shards
class ShardIndex:
    """Which shard holds which tensor, with its header shape and dtype (no tensor data read)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = self._files()
        self.where: dict[str, str] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for fname in sorted(set(files.values())) or [SINGLE]:
            try:
                with safe_open(str(self.directory / fname), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.meta[key] = (tuple(sl.get_shape()), sl.get_dtype())
                        self.where[key] = fname
            except Exception as e:  # safetensors raises its own error types for truncated/invalid files
                raise BrainsurgeonError(f"{self.directory / fname} is not a valid safetensors file ({e})") from e
        missing = sorted(k for k, f in files.items() if self.where.get(k) != f)
        if missing:
            raise BrainsurgeonError(f"{self.directory / INDEX} lists tensors its shards do not hold, e.g. {missing[:3]}")

    def _files(self) -> dict[str, str]:
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BrainsurgeonError(f"{index} is not a safetensors index (a JSON object with 'weight_map'): {e}") from e
            for fname in set(weight_map.values()):
                if not isinstance(fname, str) or Path(fname).name != fname or not (self.directory / fname).is_file():
                    raise BrainsurgeonError(f"{index} names the shard {fname!r}, which is not a file of {self.directory}")
            return dict(weight_map)
        if (self.directory / SINGLE).is_file():
            return {}
        raise BrainsurgeonError(f"{self.directory} holds neither {INDEX} nor {SINGLE}: not an HF safetensors directory")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once and closed after (its pages are not kept mapped)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for fname, keys in by_file.items():
            with safe_open(str(self.directory / fname), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k).clone()  # own memory, not a view of the mapping
        return out

    def fingerprint(self, with_times: bool = True) -> str:
        """A digest of the tensors' names, shapes, dtypes and shard sizes (and modification times:
        a resumed run must read the same files)."""
        h = hashlib.sha256()
        for k in sorted(self.meta):
            h.update(f"{k}|{self.meta[k]}|{self.where[k]}|".encode())
        for fname in sorted(set(self.where.values())):
            st = (self.directory / fname).stat()
            h.update(f"{fname}|{st.st_size}|{st.st_mtime_ns if with_times else 0}|".encode())
        return h.hexdigest()


def load_skeleton(directory: Path) -> tuple[nn.Module, ShardIndex]:
    """The HF model of ``directory`` with its parameters on ``meta``, checked against the shards."""
    import transformers
    from accelerate import init_empty_weights

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BrainsurgeonError(f"{directory} has no config.json: give an HF model directory (save_pretrained)")
    config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise BrainsurgeonError(f"{directory}/config.json asks for custom code (auto_map): never run from a model directory")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BrainsurgeonError(f"{directory}/config.json names the architecture {arch!r}, which is not a transformers model class")
    index = ShardIndex(directory)
    with init_empty_weights():
        model = cls(config)
    _check_against_shards(model, index, directory)
    return model.eval(), index


def _check_against_shards(model: nn.Module, index: ShardIndex, directory: Path) -> None:
    # a tied head is stored once, under its source's name (transformers' _tied_weights_keys: target -> source)
    tied = getattr(model, "_tied_weights_keys", None) if getattr(model.config, "tie_word_embeddings", False) else None
    aliases = {k for k, v in tied.items() if v in index.meta} if isinstance(tied, dict) else set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in aliases and name not in index.meta:
            continue
        if name not in index.meta:
            raise BrainsurgeonError(f"{directory} has no tensor {name!r} that its config's model needs")
        shape, dtype = index.meta[name]
        if shape != tuple(p.shape):
            raise BrainsurgeonError(
                f"{directory}: {name} is stored with shape {list(shape)}, the config implies {list(p.shape)}"
            )
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise BrainsurgeonError(f"{directory}: {name} has dtype {dtype}; floating-point weights expected")


# ----------------------------------------------------------------------------- moving tensors in and out
def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (names relative to ``module``) in place of its meta parameters/buffers."""
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t


def _release(module: nn.Module) -> None:
    """Parameters back to ``meta``: their memory is freed (and handed back to the system)."""
    for mod in module.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    _LIBC.trim()




def _stored_names(module: nn.Module) -> list[str]:
    """Relative names of ``module``'s parameters and persistent buffers (what a checkpoint holds)."""
    names = [n for n, _ in module.named_parameters()]
    names += [n for n, _ in module.named_buffers() if n.rpartition(".")[2] not in _non_persistent(module, n)]
    return names


def _non_persistent(module: nn.Module, name: str) -> set[str]:
    owner = name.rpartition(".")[0]
    mod = module.get_submodule(owner) if owner else module
    return set(getattr(mod, "_non_persistent_buffers_set", set()))


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class DiskHooks(BlockHooks):
    """Load each block from the shards before it, write it pruned and release it after it (module doc)."""

    def __init__(self, model: nn.Module, index: ShardIndex, work: Path, state: dict, *,
                 activations_dir: Path | None) -> None:
        self.model, self.index, self.work, self.state = model, index, work, state
        self.activations_dir = activations_dir
        self.masks: dict = {}
        self._names = {id(m): n for n, m in model.named_modules()}
        self._generation = 0
        self._rest_released = False

    # -- blocks
    def before_block(self, name: str, block: nn.Module) -> None:
        self._release_rest()
        rel = _stored_names(block)
        if name in self.state["finished"]:  # resumed: the pruned block as written
            tensors = _read_file(self.work / self.state["finished"][name], [f"{name}.{r}" for r in rel])
        else:
            tensors = self.index.read([f"{name}.{r}" for r in rel])
        _assign(block, {r: tensors[f"{name}.{r}"] for r in rel})

    def after_block(self, name: str, block: nn.Module) -> None:
        if name not in self.state["finished"]:
            self._write_block(name, block)
        _release(block)

    def prunes(self, name: str) -> bool:
        return name not in self.state["finished"]

    def attach(self, masks: dict) -> None:
        self.masks = masks

    def dense_pass(self) -> "DiskHooks":
        # prune_offloaded refuses the allocations that need a dense pass before any work
        raise BrainsurgeonError("offload='disk' runs one pass over the blocks: use allocation='uniform' or N:M")

    def _write_block(self, name: str, block: nn.Module) -> None:
        from .distributed import is_writer

        fname = f"model-{name.replace('.', '-')}.safetensors"
        layers = {}
        for rel, p in block.named_parameters():
            full = f"{name}.{rel}"
            mask = self.masks.pop(full.rpartition(".")[0], None) if rel.endswith("weight") else None
            if mask is not None:
                layers[full.rpartition(".")[0]] = {"numel": p.numel(), "zeros": int((p == 0).sum())}
        self.state["layers"].update(layers)  # every rank reports the same (broadcast) result
        if is_writer():
            tensors = {f"{name}.{r}": t.detach() for r, t in block.state_dict().items()}
            _save_atomic(tensors, self.work / fname)
            self.state["finished"][name] = fname
            _write_json(self.state, self.work / "state.json")

    def _release_rest(self) -> None:
        """After the first block's inputs are captured, nothing outside the blocks is needed."""
        if self._rest_released:
            return
        blocks = set(self.state["blocks"])
        for mname, mod in self.model.named_modules():
            if mname in blocks or any(mname.startswith(b + ".") for b in blocks):
                continue
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        self._rest_released = True

    # -- activations
    def store(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.activations_dir is None:
            return hidden
        self._generation += 1
        out = []
        for i, h in enumerate(hidden):
            path = self.activations_dir / f"act-{self._generation}-{i}.bin"
            h.detach().contiguous().cpu().numpy().tofile(path)
            out.append(torch.from_file(str(path), shared=False, size=h.numel(), dtype=h.dtype).view(h.shape))
            path.unlink()  # the mapping keeps the data; nothing is left behind on disk
        return out


def _read_file(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n).clone() for n in names}


# ----------------------------------------------------------------------------- the run
def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _check_output(out: Path, source: Path, force: bool, resume: bool) -> Path:
    """The work directory for ``out``, refused early: an existing output (unless ``force``), the
    source itself, an unwritable parent, or a stale partial run (unless ``resume``)."""
    out = Path(out)
    if out.resolve() == Path(source).resolve() or Path(source).resolve() in out.resolve().parents:
        raise BrainsurgeonError(f"out={out} is (inside) the model directory being pruned: write elsewhere")
    if out.exists() and any(out.iterdir()) and not force:
        raise BrainsurgeonError(f"{out} exists and is not empty; pass force=True (CLI --force) to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BrainsurgeonError(f"cannot write {out}: its directory {parent} does not exist or is not writable")
    work = _partial_dir(out)
    if work.exists() and not resume:
        raise BrainsurgeonError(
            f"an interrupted run left {work}: pass resume=True (CLI --resume) to continue it, or remove it"
        )
    if resume and not (work / "state.json").is_file():
        raise BrainsurgeonError(f"resume=True but there is no interrupted run of {out} to resume ({work} is missing)")
    return work


def _run_state(work: Path, fingerprint: str, blocks: list[str], resume: bool) -> dict:
    """The run's state: new (rank 0 creates the work directory), or the interrupted run's, refused
    when it was another model, method, option or calibration set. Other ranks never write; they
    read what rank 0 validated (their own calibration shard differs, so they do not re-check it)."""
    from .distributed import is_writer

    fresh = {"format": FORMAT, "fingerprint": fingerprint, "blocks": blocks, "finished": {}, "layers": {}}
    if not resume:
        if is_writer():
            work.mkdir(parents=False, exist_ok=False)
            _write_json(fresh, work / "state.json")
        return fresh
    try:
        state = json.loads((work / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BrainsurgeonError(f"{work / 'state.json'} cannot be read ({e}); remove {work} and start again") from e
    if state.get("format") != FORMAT or (is_writer() and state.get("fingerprint") != fingerprint):
        raise BrainsurgeonError(
            f"{work} is the interrupted run of another model, method, option or calibration set: remove it to start again"
        )
    return state


def _fingerprint(index: ShardIndex, settings: dict, batches) -> str:
    h = hashlib.sha256(index.fingerprint().encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()


def _finish(index: ShardIndex, source: Path, work: Path, state: dict, report: dict) -> None:
    """The tensors outside the blocks, the index, config and tokenizer files, the report."""
    blocks = state["blocks"]
    weight_map = {}
    for bname, fname in state["finished"].items():
        weight_map.update({k: fname for k in index.meta if k.startswith(bname + ".")})
    rest = [k for k in index.meta if not any(k.startswith(b + ".") for b in blocks)]
    if rest:
        _save_atomic(index.read(rest), work / "model-rest.safetensors")
        weight_map.update({k: "model-rest.safetensors" for k in rest})
    total = sum(torch.Size(index.meta[k][0]).numel() * _itemsize(index.meta[k][1]) for k in weight_map)
    _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, work / INDEX)
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, work / name)
    _write_json(report, work / "report.json")


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]


def _publish(work: Path, out: Path) -> None:
    """Rename the finished work directory to ``out`` (an existing ``out`` only goes once it is done)."""
    (work / "state.json").unlink()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old)


def _layerwise_class(method: str):
    from .pruners.layerwise import LayerwiseMethod
    from .registry import _REGISTRY, get_method

    cls = get_method(method)
    if not (isinstance(cls, type) and issubclass(cls, LayerwiseMethod)):
        scalable = sorted(n for n, c in _REGISTRY.items() if isinstance(c, type) and issubclass(c, LayerwiseMethod))
        raise BrainsurgeonError(
            f"offload='disk' runs the layer-wise methods, which need one block at a time ({', '.join(scalable)}); "
            f"{method!r} needs the whole model's backward pass"
        )
    return cls


@_LIBC.restored_after()
def prune_offloaded(
    source, data, method: str = "sparsegpt", sparsity=None, *, out, structure: str = "unstructured",
    allocation: str = "uniform", layers=None, num_samples: int | None = None, batch_size: int = 8,
    damping: float | None = None, seed: int = 0, progress: bool | None = None, offload_activations: bool = False,
    resume: bool = False, force: bool = False, **method_options,
):
    """Prune the HF model directory ``source`` block by block into the directory ``out`` (module doc).

    Returns a :class:`~brainsurgeon.engine.PruneResult` whose ``model`` is None (the pruned model is
    the directory ``out``: ``from_pretrained(out)`` loads it) and whose report gives every layer's
    achieved sparsity, the timings and the calibration path."""
    from .adapters.hf import HFAdapter, TokenView, token_batches
    from .context import PruneContext
    from .data import Calibration
    from .distributed import barrier, check_setup, is_writer
    from .engine import PruneResult, build_options
    from .progress import progress_enabled
    from .targets import find_targets

    source = Path(source)
    opts = build_options(method, sparsity, structure, allocation, 0.99, num_samples, damping, seed, "cpu", batch_size)
    _LIBC.map_large_buffers()  # freed blocks go back to the system (see _Glibc)
    if allocation != "uniform" and not opts.structure.is_nm:
        raise BrainsurgeonError(
            f"allocation={allocation!r} keeps a score per weight of the whole model in memory; out of core runs "
            "allocation='uniform' or an N:M structure"
        )
    algo = _layerwise_class(method).create(**method_options)
    work = _check_output(Path(out), source, force, resume) if is_writer() else _partial_dir(Path(out))
    model, index = load_skeleton(source)
    adapter = HFAdapter(model)
    if adapter.task == "hidden":
        raise BrainsurgeonError("out of core needs a model with its own loss head (a causal LM, a classifier), not a plain encoder")
    blocks = [n for n, _ in adapter.blocks(model)]
    rest = sorted(k for k in index.meta if not any(k.startswith(b + ".") for b in blocks))
    _assign(model, index.read(rest))  # embeddings etc.: the first block's inputs need them; released after
    batches = token_batches(data, model, batch_size=opts.batch_size, num_samples=num_samples)
    view = TokenView(model)
    targets = find_targets(view, adapter.default_layers() if layers is None else layers)
    outside = [t.name for t in targets if not any(t.name.startswith(b + ".") for b in blocks)]
    if outside:
        raise BrainsurgeonError(f"out of core prunes the layers inside the blocks; exclude {outside}")
    settings = {"method": method, "options": algo.options(), "sparsity": opts.sparsity,
                "structure": str(opts.structure), "layers": [t.name for t in targets], "seed": seed}
    check_setup(view, {**{k: str(v) for k, v in settings.items()}, "model": index.fingerprint(with_times=False),
                       "calibration samples": str(sum(len(x) for x, _ in batches))})
    barrier()  # rank 0 has checked and created the output's work directory
    state = _run_state(work, _fingerprint(index, settings, batches), blocks, resume)
    barrier()
    resumed = len(state["finished"])
    act_dir = None
    if offload_activations:
        act_dir = work / "activations"
        act_dir.mkdir(exist_ok=True)
    hooks = DiskHooks(model, index, work, state, activations_dir=act_dir)
    ctx = PruneContext(
        model=view, targets=targets, calib=Calibration(batches, given=len(batches)), loss_fn=view.loss_fn,
        options=opts, generator=torch.Generator().manual_seed(seed), show_progress=progress_enabled(progress),
        block_hooks=hooks,
    )
    algo.validate(ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        algo.run(ctx)
    report = _report(method, algo, opts, ctx, state, source, Path(out), resumed, act_dir is not None)
    if is_writer():
        _finish(index, source, work, state, report)
        if act_dir is not None:
            shutil.rmtree(act_dir, ignore_errors=True)
        _publish(work, Path(out))
    return PruneResult(model=None, report=report, masks={})


def _report(method, algo, opts, ctx, state, source: Path, out: Path, resumed: int, on_disk: bool) -> dict:
    layers = {k: {**v, "achieved_sparsity": v["zeros"] / v["numel"]} for k, v in state["layers"].items()}
    numel = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {
        "method": method, "method_options": algo.options(),
        "options": {"sparsity": opts.sparsity, "structure": str(opts.structure), "allocation": opts.allocation,
                    "num_samples": ctx.calib.num_samples, "seed": opts.seed},
        "overall": {"target_sparsity": opts.sparsity, "achieved_sparsity": zeros / max(numel, 1), "numel": numel, "zeros": zeros},
        "layers": layers,
        "timings": {f"{k}_s": v for k, v in ctx.timer.seconds.items()},
        "numerics": {"damping": ctx.numerics.damping, "fallbacks": ctx.numerics.fallbacks},
        "calibration": ctx.extra_report.get("calibration"),
        "offload": {"source": str(source), "out": str(out), "blocks": len(state["blocks"]),
                    "blocks_resumed": resumed, "activations_on_disk": on_disk},
    }
