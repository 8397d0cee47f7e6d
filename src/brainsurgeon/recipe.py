"""Recipes: one YAML file describing a whole pruning run, executed by ``brainsurgeon run recipe.yaml``.

Example::

    model: {arch: lenet300, train: {epochs: 20, lr: 0.003}}   # or {weights: model.safetensors}
    data: digits                  # digits | fashion-mnist | a .npz/.safetensors file with x and y
    method: obd
    sparsity: 0.9
    schedule: gradual             # oneshot | iterative | iterative-linear | gradual
    steps: 4
    finetune: {epochs: 8, lr: 0.001, optimizer: adam}
    layers: {exclude: [net.4]}
    output: runs/my-run

Everything is checked (unknown keys, types, missing files) before any work, with errors naming the
key and what was expected. The file is read with ``yaml.safe_load``; nothing is executed from it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BrainsurgeonError

# key -> (expected types, description); None in the types allows null
TOP_KEYS = {
    "model": ((dict, str), "a weights file path, or a mapping {weights: PATH} or {arch: NAME, kwargs: {...}, train: {...}}"),
    "data": ((str,), "digits, fashion-mnist, or a .npz/.safetensors file holding x and y"),
    "data_dir": ((str,), "the directory of the Fashion-MNIST idx files"),
    "method": ((str,), "a registered method (see `brainsurgeon methods`)"),
    "method_options": ((dict,), "a mapping of the method's own options"),
    "sparsity": ((numbers.Real,), "a fraction in [0, 1)"),
    "structure": ((str,), "unstructured or N:M such as 2:4"),
    "allocation": ((str,), "uniform, global or sensitivity"),
    "max_layer_sparsity": ((numbers.Real,), "a fraction in (0, 1)"),
    "schedule": ((str,), "oneshot, iterative, iterative-linear or gradual"),
    "steps": ((numbers.Integral,), "a positive integer (pruning rounds)"),
    "finetune": ((dict,), "a mapping of fine-tuning options (epochs, lr, optimizer, ...)"),
    "layers": ((dict, list, str), "name patterns: a list, or {include: [...], exclude: [...]}"),
    "num_samples": ((numbers.Integral,), "a positive integer (calibration samples)"),
    "damping": ((numbers.Real,), "a positive number"),
    "seed": ((numbers.Integral,), "an integer"),
    "output": ((str,), "the output directory"),
}
REQUIRED = ("model", "data", "method", "output")
MODEL_KEYS = {"weights": (str,), "arch": (str,), "kwargs": (dict,), "factory": (str,), "train": (dict,)}
TRAIN_KEYS = {"epochs": (numbers.Integral,), "lr": (numbers.Real,), "batch_size": (numbers.Integral,), "seed": (numbers.Integral,)}
FINETUNE_KEYS = {
    "epochs": (numbers.Real,), "lr": (numbers.Real,), "optimizer": (str,), "momentum": (numbers.Real,),
    "weight_decay": (numbers.Real,), "batch_size": (numbers.Integral,), "val_fraction": (numbers.Real,),
    "select": (str,), "lr_schedule": (str,), "seed": (numbers.Integral,),
}


def _type_ok(value, types) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check_keys(mapping: dict, allowed: dict, where: str) -> None:
    for key, value in mapping.items():
        if key not in allowed:
            raise BrainsurgeonError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")
        types = allowed[key][0] if isinstance(allowed[key], tuple) and isinstance(allowed[key][0], tuple) else allowed[key]
        if not _type_ok(value, types):
            names = "/".join(t.__name__ for t in types).replace("Real", "number").replace("Integral", "integer")
            desc = f" ({allowed[key][1]})" if isinstance(allowed[key][0], tuple) else ""
            raise BrainsurgeonError(
                f"{where}: key {key!r} must be {names}{desc}, got {type(value).__name__} {value!r}"
            )


@dataclass
class Recipe:
    """A validated recipe; ``raw`` is the mapping as read, ``base`` the directory relative paths start from."""

    raw: dict
    base: Path
    source: str = "recipe"

    @property
    def hash(self) -> str:
        """Identifies the run: the canonical JSON of everything but the output directory."""
        body = {k: v for k, v in self.raw.items() if k != "output"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    @property
    def output(self) -> Path:
        return self.path(self.raw["output"])

    def get(self, key, default=None):
        return self.raw.get(key, default)


def validate(raw, base: Path = Path("."), source: str = "recipe") -> Recipe:
    """Check every key, type and file of a recipe mapping; returns a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise BrainsurgeonError(f"{source}: a recipe must be a YAML mapping of keys, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, source)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise BrainsurgeonError(
            f"{source}: missing required key(s) {missing}; a recipe needs at least " + ", ".join(REQUIRED)
        )
    if "sparsity" not in raw and ":" not in str(raw.get("structure", "")):
        raise BrainsurgeonError(f"{source}: missing key 'sparsity' (a fraction in [0, 1)); only N:M structures may leave it out")
    recipe = Recipe(raw=copy.deepcopy(raw), base=base, source=source)
    model = raw["model"]
    if isinstance(model, str):
        model = {"weights": model}
        recipe.raw["model"] = model
    _check_keys(model, MODEL_KEYS, f"{source}: model")
    if "weights" in model:
        if not recipe.path(model["weights"]).exists():
            raise BrainsurgeonError(f"{source}: model.weights file {recipe.path(model['weights'])} does not exist")
        if "train" in model:
            raise BrainsurgeonError(f"{source}: model has both 'weights' and 'train'; give trained weights or a training spec")
    elif "arch" not in model and "factory" not in model:
        raise BrainsurgeonError(f"{source}: model needs 'weights' (a file) or 'arch'/'factory' with 'train' settings")
    elif "train" not in model:
        raise BrainsurgeonError(f"{source}: model {model.get('arch') or model.get('factory')!r} has no weights: add 'train: {{epochs: N}}' or 'weights: PATH'")
    if "train" in model:
        _check_keys(model["train"], TRAIN_KEYS, f"{source}: model.train")
    if "finetune" in raw:
        _check_keys(raw["finetune"], FINETUNE_KEYS, f"{source}: finetune")
    data = raw["data"]
    if Path(data).suffix in (".npz", ".safetensors") and not recipe.path(data).exists():
        raise BrainsurgeonError(f"{source}: data file {recipe.path(data)} does not exist")
    if data not in ("digits", "fashion-mnist", "fashion_mnist", "fmnist") and Path(data).suffix not in (".npz", ".safetensors"):
        raise BrainsurgeonError(f"{source}: key 'data' must be digits, fashion-mnist, or a .npz/.safetensors file; got {data!r}")
    _check_run_options(raw, source)
    return recipe


def _check_run_options(raw: dict, source: str) -> None:
    """The pruning and fine-tuning options, checked as ``bs.prune`` and ``bs.FineTune`` would, before any work."""
    import torch

    from .engine import _method_class, build_options
    from .finetune import FineTune
    from .schedules import check_schedule

    _method_class(raw["method"]).create(**raw.get("method_options", {}))
    try:
        build_options(
            raw["method"], raw.get("sparsity"), raw.get("structure", "unstructured"), raw.get("allocation", "uniform"),
            raw.get("max_layer_sparsity", 0.99), raw.get("num_samples", 1024), raw.get("damping"), raw.get("seed", 0),
            "cpu", 128,
        )
        check_schedule(raw.get("schedule", "oneshot"), raw.get("steps"), None)
        if "finetune" in raw:
            # the options alone (types, ranges), on stand-in data; the budget is checked on the real data
            FineTune((torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long)), **raw["finetune"])
            if raw["finetune"].get("epochs", 1) == 0 and raw.get("schedule", "oneshot") != "oneshot":
                raise BrainsurgeonError("finetune.epochs is 0 but the schedule fine-tunes between rounds; give epochs > 0")
    except BrainsurgeonError as e:
        raise BrainsurgeonError(f"{source}: {e}") from e


def load_recipe(path: str | Path) -> Recipe:
    """Read (``yaml.safe_load``) and validate a recipe file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise BrainsurgeonError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BrainsurgeonError(f"recipe {path} is not valid YAML: {e}") from e
    return validate(raw, base=path.resolve().parent, source=str(path))


def _build_model(recipe: Recipe, ds):
    """The model to prune: loaded from weights, or built and trained as the recipe says."""
    import torch

    from .io import load_model
    from .models import build_model, make_spec
    from .train import train_model

    m = recipe.raw["model"]
    if "weights" in m:
        spec = None
        if "arch" in m:
            spec = make_spec(m["arch"], **(m.get("kwargs") or {}))
        elif "factory" in m:
            spec = {"factory": m["factory"], "kwargs": m.get("kwargs") or {}}
        model = load_model(recipe.path(m["weights"]), spec)
        return model, model.brainsurgeon_spec, None
    if "arch" in m:
        kwargs = {"input_shape": ds.input_shape, "num_classes": ds.num_classes, **(m.get("kwargs") or {})}
        spec = make_spec(m["arch"], **kwargs)
    else:
        spec = {"factory": m["factory"], "kwargs": m.get("kwargs") or {}}
    t = m["train"]
    torch.manual_seed(int(t.get("seed", recipe.get("seed", 0))))
    model = build_model(spec)
    t0 = time.perf_counter()
    train_model(model, ds.train, epochs=int(t.get("epochs", 10)), lr=float(t.get("lr", 1e-3)),
                batch_size=int(t.get("batch_size", 128)), seed=int(t.get("seed", recipe.get("seed", 0))))
    return model, spec, time.perf_counter() - t0


def run_recipe(recipe: Recipe, resume: bool = False, round_hook=None, progress=None) -> dict:
    """Execute a recipe: prune (with schedule/fine-tuning), checkpoint every round, write model and report.

    Returns the report (also written as ``report.json``/``report.md`` with plots in the output directory).
    """
    from .checkpoint import Checkpoint
    from .data import load_dataset
    from .evaluate import evaluate
    from .finetune import FineTune
    from .io import save_weights
    from .reports import write_run_report
    from .schedules import run_schedule

    r = recipe.raw
    out = recipe.output
    ckpt = Checkpoint(out / "checkpoint", recipe.hash)
    if resume and not ckpt.exists():
        raise BrainsurgeonError(f"--resume: no checkpoint in {out / 'checkpoint'}; run without --resume to start")
    data_dir = recipe.path(r["data_dir"]) if "data_dir" in r else None
    data_spec = str(recipe.path(r["data"])) if Path(r["data"]).suffix in (".npz", ".safetensors") else r["data"]
    ds = load_dataset(data_spec, data_dir)
    seed = int(r.get("seed", 0))
    ft = None
    if "finetune" in r:
        ft = FineTune(ds.train, **{"seed": seed, **r["finetune"]})
    model, spec, train_s = _build_model(recipe, ds)
    if not resume:
        ckpt.clear()
    before = evaluate(model, ds.test)
    res = run_schedule(
        model, ds.train, r["method"], r.get("sparsity"), schedule=r.get("schedule", "oneshot"), steps=r.get("steps"),
        finetune=ft, structure=r.get("structure", "unstructured"), allocation=r.get("allocation", "uniform"),
        max_layer_sparsity=r.get("max_layer_sparsity", 0.99), num_samples=r.get("num_samples", 1024),
        damping=r.get("damping"), layers=r.get("layers"), seed=seed, progress=progress,
        checkpoint=ckpt, resume=resume, round_hook=round_hook, **r.get("method_options", {}),
    )
    after = evaluate(res.model, ds.test)
    report = dict(res.report)
    report["recipe"] = {"source": recipe.source, "hash": recipe.hash, "body": r}
    report["evaluation"] = {
        "split": f"{ds.name} test", "samples": after["samples"], "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"], "loss_before": before["loss"], "loss_after": after["loss"],
    }
    if train_s is not None:
        report["dense_training_seconds"] = train_s
    out.mkdir(parents=True, exist_ok=True)
    save_weights(res.model.cpu(), out / "model.safetensors", spec, extra={"brainsurgeon.method": r["method"]})
    write_run_report(report, out)
    return report
