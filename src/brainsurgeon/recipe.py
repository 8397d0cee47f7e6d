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
    structure: unstructured       # or 2:4, or channel (whole units, one-shot, then fine-tuned if asked)
    device: cpu
    output: runs/my-run

Everything is checked (unknown keys, types, missing files, a non-empty ``output`` without ``--force``,
an ``output`` that would replace an input, an unwritable location) before any work, with errors
naming the key and what was expected. The file is read with ``yaml.safe_load``; nothing is executed
from it.

The run works in a directory beside ``output`` (``.NAME.partial``): the dense model once trained,
the checkpoint of every round, then the model, reports and plots; only a finished run is renamed to
``output``. ``--resume`` continues from that directory (or, after a finished run, from
``output/checkpoint``) without retraining the dense model.
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
    "structure": ((str,), "unstructured, N:M such as 2:4, or channel (whole units, one-shot)"),
    "device": ((str,), "cpu, cuda or cuda:N"),
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
    allow_factory: bool = False  # model.factory imports and calls code: only when the user allows it

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


def validate(raw, base: Path = Path("."), source: str = "recipe", allow_factory: bool = False) -> Recipe:
    """Check every key, type and file of a recipe mapping; returns a :class:`Recipe`.

    ``model.factory`` names code to import and call, so it is refused unless ``allow_factory=True``
    (``--allow-factory`` on the command line): a recipe alone never runs code.
    """
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
    recipe = Recipe(raw=copy.deepcopy(raw), base=base, source=source, allow_factory=allow_factory)
    model = raw["model"]
    if isinstance(model, str):
        model = {"weights": model}
        recipe.raw["model"] = model
    _check_keys(model, MODEL_KEYS, f"{source}: model")
    if "factory" in model and not allow_factory:
        raise BrainsurgeonError(
            f"{source}: model.factory {model['factory']!r} would import and run that code, and a recipe alone never "
            "runs code: if you trust it, pass --allow-factory (Python: allow_factory=True)"
        )
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
    channel = raw.get("structure") == "channel"
    try:
        build_options(
            raw["method"], raw.get("sparsity"), "unstructured" if channel else raw.get("structure", "unstructured"),
            raw.get("allocation", "uniform"), raw.get("max_layer_sparsity", 0.99), raw.get("num_samples", 1024),
            raw.get("damping"), raw.get("seed", 0), raw.get("device", "cpu"), 128,
        )
        if channel:
            _check_channel(raw)
        check_schedule(raw.get("schedule", "oneshot"), raw.get("steps"), None)
        if "finetune" in raw:
            # the options alone (types, ranges), on stand-in data; the budget is checked on the real data
            FineTune((torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long)), **raw["finetune"])
            if raw["finetune"].get("epochs", 1) == 0 and raw.get("schedule", "oneshot") != "oneshot":
                raise BrainsurgeonError("finetune.epochs is 0 but the schedule fine-tunes between rounds; give epochs > 0")
    except BrainsurgeonError as e:
        raise BrainsurgeonError(f"{source}: {e}") from e


def _check_channel(raw: dict) -> None:
    """``structure: channel``: a structured method, one-shot (fine-tuning after it is allowed)."""
    from .registry import supports
    from .structured.engine import structured_methods

    if not supports(raw["method"], "channel"):
        raise BrainsurgeonError(
            f"method {raw['method']!r} prunes single weights; structure: channel needs one of {', '.join(structured_methods())}"
        )
    if raw.get("schedule", "oneshot") != "oneshot" or "steps" in raw:
        raise BrainsurgeonError("structure: channel prunes in one round: leave schedule and steps out (finetune is allowed)")
    if raw.get("allocation", "uniform") not in ("uniform", "global"):
        raise BrainsurgeonError(f"structure: channel supports allocation uniform or global, got {raw['allocation']!r}")


def load_recipe(path: str | Path, allow_factory: bool = False) -> Recipe:
    """Read (``yaml.safe_load``) and validate a recipe file (``allow_factory``: see :func:`validate`)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise BrainsurgeonError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BrainsurgeonError(f"recipe {path} is not valid YAML: {e}") from e
    return validate(raw, base=path.resolve().parent, source=str(path), allow_factory=allow_factory)


OUTPUT_NAMES = ("model.safetensors", "report.json", "report.md", "layer_sparsity.png", "rounds.png",
                "sensitivity.png", "checkpoint")
DENSE = "dense.safetensors"
HASH_KEY = "brainsurgeon.recipe_hash"


def staging_dir(out: Path) -> Path:
    """Where a run works until it is finished and renamed to ``out`` (kept after a kill, for ``--resume``)."""
    return out.parent / f".{out.name}.partial"


def _inputs(recipe: Recipe) -> list[Path]:
    """The files a run reads: never to be overwritten by its output."""
    r = recipe.raw
    files = [Path(recipe.source)] if Path(recipe.source).exists() else []
    if "weights" in r["model"]:
        files.append(recipe.path(r["model"]["weights"]))
    if Path(r["data"]).suffix in (".npz", ".safetensors"):
        files.append(recipe.path(r["data"]))
    return files


def _model_spec(recipe: Recipe, ds) -> dict:
    m = recipe.raw["model"]
    if "arch" in m:
        from .models import make_spec

        kwargs = {} if "weights" in m else {"input_shape": ds.input_shape, "num_classes": ds.num_classes}
        return make_spec(m["arch"], **{**kwargs, **(m.get("kwargs") or {})})
    return {"factory": m["factory"], "kwargs": m.get("kwargs") or {}}


def _build_model(recipe: Recipe, ds, checkpoint_dir: Path | None = None, progress=None):
    """The model to prune: loaded from weights, or built and trained as the recipe says. A trained model
    is saved in ``checkpoint_dir``, and loaded from there (not retrained) when it is already there."""
    import torch

    from .io import load_model, save_weights
    from .models import build_model
    from .progress import progress_enabled, stage
    from .train import train_model

    m = recipe.raw["model"]
    factory = m.get("factory") if recipe.allow_factory else None  # otherwise build_model refuses a factory spec
    if "weights" in m:
        if "factory" in m:
            model = load_model(recipe.path(m["weights"]), factory=factory, factory_kwargs=m.get("kwargs"))
        else:
            model = load_model(recipe.path(m["weights"]), _model_spec(recipe, ds) if "arch" in m else None)
        return model, model.brainsurgeon_spec, None
    spec = _model_spec(recipe, ds)
    dense = checkpoint_dir / DENSE if checkpoint_dir is not None else None
    if dense is not None and dense.exists():
        from safetensors import safe_open

        with safe_open(str(dense), "pt") as f:
            meta = f.metadata() or {}
        if meta.get(HASH_KEY) == recipe.hash:
            stage(f"dense model: loaded from the checkpoint {dense} (not retrained)", progress_enabled(progress))
            dense_model = load_model(dense, factory=factory) if "factory" in m else load_model(dense, spec)
            return dense_model, spec, float(meta.get("brainsurgeon.train_seconds", "nan"))
    t = m["train"]
    seed = int(t.get("seed", recipe.get("seed", 0)))
    torch.manual_seed(seed)
    model = build_model(spec, factory=factory)
    t0 = time.perf_counter()
    train_model(model, ds.train, epochs=int(t.get("epochs", 10)), lr=float(t.get("lr", 1e-3)),
                batch_size=int(t.get("batch_size", 128)), seed=seed, device=recipe.get("device", "cpu"),
                progress=progress_enabled(progress))
    train_s = time.perf_counter() - t0
    model.cpu()
    model.brainsurgeon_spec = spec  # a compact structured result derives its own spec from it
    if dense is not None:
        save_weights(model, dense, spec, extra={HASH_KEY: recipe.hash, "brainsurgeon.train_seconds": str(train_s)})
    return model, spec, train_s


def _checkpoint_hash(ckpt_dir: Path) -> str | None:
    """The recipe hash a checkpoint directory was made by (its state, else its dense model)."""
    state = ckpt_dir / "state.json"
    if state.exists():
        try:
            return json.loads(state.read_text()).get("recipe_hash")
        except (OSError, json.JSONDecodeError):
            return None
    if (ckpt_dir / DENSE).exists():
        from safetensors import safe_open

        with safe_open(str(ckpt_dir / DENSE), "pt") as f:
            return (f.metadata() or {}).get(HASH_KEY)
    return None


def _prepare(recipe: Recipe, resume: bool, force: bool) -> Path:
    """Check the output before any work; returns the staging directory, set up for a fresh run or a resume."""
    import shutil

    from .outputs import check_output

    out = recipe.output
    staging = staging_dir(out)
    flag = f"{recipe.source}: output"
    if resume:
        if not (staging / "checkpoint").is_dir() and (out / "checkpoint").is_dir():
            check_output(out, force=True, inputs=_inputs(recipe), outputs=OUTPUT_NAMES, flag=flag)
            shutil.copytree(out / "checkpoint", staging / "checkpoint")  # a finished run: continue from its copy
        made_by = _checkpoint_hash(staging / "checkpoint")
        if made_by is None:
            raise BrainsurgeonError(
                f"--resume: no checkpoint in {staging / 'checkpoint'} or {out / 'checkpoint'}; run without --resume to start"
            )
        if made_by != recipe.hash:
            raise BrainsurgeonError(
                f"--resume: the checkpoint was made by a different recipe (hash {made_by!r}, this one {recipe.hash!r}); "
                "resume with the same recipe, or run without --resume (with --force to replace the output)"
            )
    check_output(out, force=force, inputs=_inputs(recipe), outputs=OUTPUT_NAMES, flag=flag, allow_existing=resume)
    if not resume and staging.exists():
        shutil.rmtree(staging)  # an interrupted earlier attempt: this run starts afresh
    return staging


def run_recipe(recipe: Recipe, resume: bool = False, round_hook=None, progress=None, force: bool = False) -> dict:
    """Execute a recipe: prune (with schedule/fine-tuning), checkpoint every round, write model and report.

    The output directory must not exist or be empty (``force``: files of the same names are replaced,
    others stay; ``resume``: continue the same recipe). Returns the report (also written as
    ``report.json``/``report.md`` with plots in the output directory).
    """
    from .outputs import staged_dir

    staging = _prepare(recipe, resume, force)
    with staged_dir(recipe.output, flag="output (in the recipe)", keep_on_error=True, staging=staging) as work:
        return _run(recipe, work, resume, round_hook, progress)


def _run(recipe: Recipe, work: Path, resume: bool, round_hook, progress) -> dict:
    from .checkpoint import Checkpoint
    from .data import load_dataset
    from .evaluate import evaluate
    from .finetune import FineTune
    from .io import save_weights
    from .progress import progress_enabled, stage
    from .reports import write_run_report

    r = recipe.raw
    device = r.get("device", "cpu")
    ckpt = Checkpoint(work / "checkpoint", recipe.hash)
    data_dir = recipe.path(r["data_dir"]) if "data_dir" in r else None
    data_spec = str(recipe.path(r["data"])) if Path(r["data"]).suffix in (".npz", ".safetensors") else r["data"]
    ds = load_dataset(data_spec, data_dir)
    seed = int(r.get("seed", 0))
    ft = None
    if "finetune" in r:
        ft = FineTune(ds.train, **{"seed": seed, "device": device, **r["finetune"]})
        ft.progress = progress  # fine-tuning shows its steps like the pruning does
    (work / "checkpoint").mkdir(exist_ok=True)
    model, spec, train_s = _build_model(recipe, ds, work / "checkpoint", progress)
    if not resume:
        ckpt.clear()
    before = evaluate(model, ds.test, device=device)
    if r.get("structure") == "channel":
        res = _prune_channels(model, ds, r, ft, seed, device, progress)
        spec = getattr(res.model, "brainsurgeon_spec", spec)  # the compact model's smaller layers
    else:
        from .schedules import run_schedule

        res = run_schedule(
            model, ds.train, r["method"], r.get("sparsity"), schedule=r.get("schedule", "oneshot"), steps=r.get("steps"),
            finetune=ft, structure=r.get("structure", "unstructured"), allocation=r.get("allocation", "uniform"),
            max_layer_sparsity=r.get("max_layer_sparsity", 0.99), num_samples=r.get("num_samples", 1024),
            damping=r.get("damping"), layers=r.get("layers"), seed=seed, device=device, progress=progress,
            checkpoint=ckpt, resume=resume, round_hook=round_hook, **r.get("method_options", {}),
        )
    stage("evaluating and writing the output", progress_enabled(progress))
    after = evaluate(res.model, ds.test, device=device)
    report = dict(res.report)
    report["recipe"] = {"source": recipe.source, "hash": recipe.hash, "body": r}
    report["evaluation"] = {
        "split": f"{ds.name} test", "samples": after["samples"], "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"], "loss_before": before["loss"], "loss_after": after["loss"],
    }
    if train_s is not None:
        report["dense_training_seconds"] = train_s
    save_weights(res.model.cpu(), work / "model.safetensors", spec, extra={"brainsurgeon.method": r["method"]})
    write_run_report(report, work)
    return report


def _prune_channels(model, ds, r: dict, ft, seed: int, device, progress):
    """``structure: channel``: one structured pruning, then fine-tuning of the result if asked."""
    from .engine import prune
    from .finetune import finetune

    res = prune(
        model, ds.train, r["method"], r.get("sparsity"), structure="channel", allocation=r.get("allocation", "uniform"),
        max_layer_sparsity=r.get("max_layer_sparsity", 0.99), num_samples=r.get("num_samples", 1024),
        damping=r.get("damping"), layers=r.get("layers"), seed=seed, device=device, progress=progress,
        **r.get("method_options", {}),
    )
    if ft is None or ft.total_steps == 0:
        return res
    tuned = finetune(res.model, config=ft)  # held: the exact zeros (none in a compact model)
    spec = getattr(res.model, "brainsurgeon_spec", None)
    if spec is not None:
        tuned.brainsurgeon_spec = spec
    report = dict(res.report, finetune={**ft.options(), "history": tuned.finetune_history})
    return type(res)(model=tuned, report=report, masks=res.masks)
