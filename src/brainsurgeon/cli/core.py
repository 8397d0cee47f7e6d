"""The core commands: ``methods``, ``train``, ``prune`` and ``evaluate``.

Bad input (a :class:`~brainsurgeon.errors.BrainsurgeonError`) is printed as one line on stderr and
exits with code 2, like a usage error; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..errors import BrainsurgeonError
from . import app

EXIT_BAD_INPUT = 2

# ----------------------------------------------------------------------------- shared helpers


def _handle_errors(fn: Callable) -> Callable:
    """Turn bad input into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrainsurgeonError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, value); the value is parsed as JSON when it is JSON (``3``, ``true``,
    ``[1, 2]``), otherwise kept as a string (``mode=fast``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise BrainsurgeonError(f"--option {text!r} must look like key=value (e.g. --option block_size=64)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def parse_options(items: list[str] | None) -> dict:
    options: dict = {}
    for item in items or []:
        key, value = parse_option(item)
        if key in options:
            raise BrainsurgeonError(f"--option {key} is given twice")
        options[key] = value
    return options


def _factory_spec(factory: str | None, factory_kwargs: str | None) -> dict | None:
    """The spec of a user's model from ``--factory`` and ``--factory-kwargs`` (None: use the file's spec)."""
    if factory is None:
        if factory_kwargs is not None:
            raise BrainsurgeonError("--factory-kwargs needs --factory package.module:function")
        return None
    kwargs = {}
    if factory_kwargs is not None:
        try:
            kwargs = json.loads(factory_kwargs)
        except json.JSONDecodeError as e:
            raise BrainsurgeonError(f"--factory-kwargs must be a JSON object, e.g. '{{\"width\": 64}}' ({e})") from e
        if not isinstance(kwargs, dict):
            raise BrainsurgeonError(f"--factory-kwargs must be a JSON object, got {factory_kwargs!r}")
    return {"factory": factory, "kwargs": kwargs}


def _load(model_path: Path, factory: str | None, factory_kwargs: str | None):
    from ..io import load_model

    spec = _factory_spec(factory, factory_kwargs)
    model = load_model(model_path, spec)
    return model, model.brainsurgeon_spec


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_out_file(out: Path, force: bool, inputs: list[Path]) -> None:
    """An output file may replace an existing one only with ``--force``, and never an input."""
    for p in inputs:
        if _same_file(out, p):
            raise BrainsurgeonError(f"--out {out} is an input file; write the result elsewhere")
    if out.exists() and not force:
        raise BrainsurgeonError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise BrainsurgeonError(f"{out} is a directory; --out must name a file")


def _check_out_dir(out: Path, force: bool, outputs: list[str], inputs: list[Path]) -> None:
    """``--out DIR``: refused if it exists (unless ``--force``), is a file, or would overwrite an input."""
    if out.exists() and not out.is_dir():
        raise BrainsurgeonError(f"--out {out} is a file; it must be a directory (it will be created)")
    if out.exists() and not force:
        raise BrainsurgeonError(f"--out {out} exists; pass --force to write into it")
    for name in outputs:
        for p in inputs:
            if _same_file(out / name, p):
                raise BrainsurgeonError(
                    f"--out {out} would overwrite the input {p} with {name}; choose another directory"
                )


def _console(quiet: bool = False) -> Console:
    return Console(file=sys.stdout, quiet=quiet, soft_wrap=False)


def _fmt_sparsity(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_acc(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


# ----------------------------------------------------------------------------- methods


@app.command("methods")
@_handle_errors
def methods_cmd() -> None:
    """List the registered pruning methods."""
    from ..registry import get_method, methods

    table = Table(title="brainsurgeon methods")
    table.add_column("method", style="bold")
    table.add_column("summary")
    table.add_column("N:M")
    for name, summary in methods().items():
        table.add_row(name, summary, "yes" if get_method(name).supports_nm else "no")
    _console().print(table)


# ----------------------------------------------------------------------------- train


@app.command("train")
@_handle_errors
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="where to write the weights (.safetensors, with the architecture spec)")],
    arch: Annotated[str, typer.Option(help="lenet300, lenet5 or resnet")] = "lenet300",
    data: Annotated[str, typer.Option(help="digits, fashion-mnist, or a .npz/.safetensors file holding x and y")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(help="directory of the Fashion-MNIST idx files")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    seed: int = 0,
    device: str = "cpu",
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train a reference model and save it with its architecture spec."""
    from ..data import load_dataset
    from ..evaluate import evaluate
    from ..io import save_weights
    from ..models import build_model, make_spec
    from ..progress import progress_enabled
    from ..train import train_model

    if out.suffix != ".safetensors":
        raise BrainsurgeonError(f"--out {out} must be a .safetensors file")
    inputs = [Path(data)] if Path(data).suffix in (".npz", ".safetensors") else []
    _check_out_file(out, force, inputs)
    ds = load_dataset(data, data_dir)
    spec = make_spec(arch, input_shape=ds.input_shape, num_classes=ds.num_classes)
    torch.manual_seed(seed)  # the initialisation
    model = build_model(spec)
    train_model(
        model, ds.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
        progress=progress_enabled(None) and not quiet,
    )
    metrics = evaluate(model, ds.test, device=device)
    save_weights(model.cpu(), out, spec, extra={"brainsurgeon.test_accuracy": metrics["accuracy"]})
    typer.echo(
        f"{arch} on {ds.name}: test accuracy {_fmt_acc(metrics['accuracy'])}, loss {metrics['loss']:.4f} "
        f"({metrics['samples']} samples); wrote {out}"
    )


# ----------------------------------------------------------------------------- prune


@app.command("prune")
@_handle_errors
def prune_cmd(
    model: Annotated[Path, typer.Option("--model", help="weights (.safetensors with spec, or with --factory any torch file)")],
    data: Annotated[str, typer.Option(help="calibration data: digits, fashion-mnist, or a .npz/.safetensors file")],
    method: Annotated[str, typer.Option(help="a registered method (see `brainsurgeon methods`)")],
    out: Annotated[Path, typer.Option("--out", help="output directory: model.safetensors and report.json")],
    sparsity: Annotated[Optional[float], typer.Option(help="fraction of weights to remove, in [0, 1)")] = None,
    factory: Annotated[Optional[str], typer.Option(help="package.module:function that builds the model")] = None,
    factory_kwargs: Annotated[Optional[str], typer.Option(help="JSON object of the factory's keyword arguments")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="directory of the Fashion-MNIST idx files")] = None,
    structure: Annotated[str, typer.Option(help="unstructured, N:M (e.g. 2:4), or channel (whole units)")] = "unstructured",
    compact: Annotated[bool, typer.Option(help="with --structure channel: physically smaller layers (else zeroed units)")] = True,
    round_to: Annotated[Optional[int], typer.Option(help="with --structure channel: every layer keeps a multiple of this many units")] = None,
    recalibrate_bn: Annotated[str, typer.Option(help="with --structure channel: re-estimate BatchNorm statistics on the calibration data: auto (where that lowers the calibration loss), yes or no")] = "auto",
    allocation: Annotated[str, typer.Option(help="uniform or global")] = "uniform",
    max_layer_sparsity: Annotated[float, typer.Option(help="cap per layer under global allocation")] = 0.99,
    num_samples: Annotated[int, typer.Option(help="calibration samples (from the training split)")] = 1024,
    damping: Annotated[Optional[float], typer.Option(help="relative damping of curvature inverses")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="layer name pattern to prune (repeatable)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="layer name pattern to leave dense (repeatable)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="method option key=value (repeatable)")] = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 128,
    force: Annotated[bool, typer.Option(help="write into --out even if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars and no summary table")] = False,
) -> None:
    """Prune a model and write DIR/model.safetensors and DIR/report.json."""
    from .. import engine
    from ..data import load_dataset
    from ..evaluate import evaluate
    from ..io import save_weights, write_json

    # Everything that can be checked without loading anything comes first.
    method_options = parse_options(option)
    bn_choice = _recalibrate_choice(recalibrate_bn)
    layers = None
    if include or exclude:
        layers = {"include": list(include or []), "exclude": list(exclude or [])}
    inputs = [model] + ([Path(data)] if Path(data).suffix in (".npz", ".safetensors") else [])
    _check_out_dir(out, force, ["model.safetensors", "report.json"], inputs)
    if not model.exists():
        raise BrainsurgeonError(f"--model {model} does not exist")

    net, spec = _load(model, factory, factory_kwargs)
    ds = load_dataset(data, data_dir)
    res = engine.prune(
        net, ds.train, method, sparsity, structure=structure, allocation=allocation,
        max_layer_sparsity=max_layer_sparsity, num_samples=num_samples, damping=damping, layers=layers,
        seed=seed, device=device, batch_size=batch_size, progress=False if quiet else None,
        **({"compact": compact, "recalibrate_bn": bn_choice} if structure == "channel" else {}),
        **({"round_to": round_to} if round_to is not None else {}), **method_options,
    )
    before = evaluate(net, ds.test, device=device)  # after pruning: the engine checks the data first
    after = evaluate(res.model, ds.test, device=device)

    report = dict(res.report)
    report["input"] = {"model": str(model), "data": data, "spec": spec}
    report["evaluation"] = {
        "split": f"{ds.name} test",
        "samples": before["samples"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "loss_before": before["loss"],
        "loss_after": after["loss"],
    }
    out.mkdir(parents=True, exist_ok=True)
    # a compact (structured) model carries the spec of its smaller layers
    save_weights(res.model.cpu(), out / "model.safetensors", getattr(res.model, "brainsurgeon_spec", spec),
                 extra={"brainsurgeon.method": method})
    write_json(out / "report.json", report)
    if not quiet:
        _print_prune_summary(report, out)


def _recalibrate_choice(value: str) -> bool | str:
    choices = {"auto": "auto", "yes": True, "no": False}
    if value not in choices:
        raise BrainsurgeonError(f"--recalibrate-bn must be auto, yes or no; got {value!r}")
    return choices[value]


def _print_prune_summary(report: dict, out: Path) -> None:
    ov, ev = report["overall"], report["evaluation"]
    table = Table(title=f"{report['method']} at {report['options']['structure']} / {report['options']['allocation']}")
    table.add_column("layer")
    table.add_column("weights", justify="right")
    table.add_column("target sparsity", justify="right")
    table.add_column("achieved sparsity", justify="right")
    if report["options"]["structure"] == "channel":
        _structured_rows(table, report)
    else:
        for name, rep in report["layers"].items():
            table.add_row(name, str(rep["numel"]), _fmt_sparsity(rep["target_sparsity"]), _fmt_sparsity(rep["achieved_sparsity"]))
        table.add_section()
        table.add_row("overall", str(ov["numel"]), _fmt_sparsity(ov["target_sparsity"]), _fmt_sparsity(ov["achieved_sparsity"]))
    console = _console()
    console.print(table)
    console.print(
        f"test accuracy ({ev['split']}, {ev['samples']} samples): "
        f"{_fmt_acc(ev['accuracy_before'])} before -> {_fmt_acc(ev['accuracy_after'])} after; "
        f"{report['timings']['total_s']:.2f} s"
    )
    console.print(f"wrote {out / 'model.safetensors'} and {out / 'report.json'}")


def _structured_rows(table: Table, report: dict) -> None:
    """Rows of a structured report: units per group, and parameters/FLOPs before and after."""
    table.columns[1].header, table.columns[2].header, table.columns[3].header = "units", "removed", "units after"
    for name, g in report.get("groups", {}).items():
        table.add_row(name, str(g["units_before"]), str(g["removed"]), str(g["units_after"]) + (" (capped)" if g["capped"] else ""))
    cost = report.get("cost")
    if cost:
        table.add_section()
        for key in ("params", "flops"):
            if key in cost["before"]:
                table.add_row(key, str(cost["before"][key]), "", str(cost["after"][key]))
        for batch, ratio in cost.get("speedup", {}).items():
            table.add_row(f"speedup, {batch.replace('_', ' ')}", "", "", f"{ratio:.2f}x")


# ----------------------------------------------------------------------------- evaluate


@app.command("evaluate")
@_handle_errors
def evaluate_cmd(
    model: Annotated[Path, typer.Option("--model", help="weights (.safetensors with spec, or with --factory any torch file)")],
    data: Annotated[str, typer.Option(help="digits, fashion-mnist, or a .npz/.safetensors file")] = "digits",
    factory: Annotated[Optional[str], typer.Option(help="package.module:function that builds the model")] = None,
    factory_kwargs: Annotated[Optional[str], typer.Option(help="JSON object of the factory's keyword arguments")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="directory of the Fashion-MNIST idx files")] = None,
    device: str = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Accuracy and loss on the test split, and the sparsity of the prunable weights."""
    from ..data import load_dataset
    from ..evaluate import evaluate
    from ..targets import find_targets

    net, _ = _load(model, factory, factory_kwargs)
    ds = load_dataset(data, data_dir)
    metrics = evaluate(net, ds.test, device=device)
    targets = find_targets(net)
    numel = sum(t.weight.numel() for t in targets)
    metrics["sparsity"] = sum(int((t.weight == 0).sum()) for t in targets) / numel
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(
        f"{ds.name} test: accuracy {_fmt_acc(metrics['accuracy'])}, loss {metrics['loss']:.4f} "
        f"({metrics['samples']} samples); prunable weights {100 * metrics['sparsity']:.2f}% zero"
    )
