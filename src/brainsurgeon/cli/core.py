"""The core commands: ``methods``, ``train``, ``prune`` and ``evaluate``.

Bad input (a :class:`~brainsurgeon.errors.BrainsurgeonError`) is printed as one line on stderr and
exits with code 2, like a usage error; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..errors import BrainsurgeonError
from . import app, cli_message

EXIT_BAD_INPUT = 2

# ----------------------------------------------------------------------------- shared helpers


def _handle_errors(fn: Callable) -> Callable:
    """Turn bad input into a one-line message and exit code 2 (no traceback)."""

    options = list(inspect.signature(fn).parameters)  # the engine's structure='channel' -> --structure channel

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _cli_warnings(quiet=bool(kwargs.get("quiet"))):
                return fn(*args, **kwargs)
        except BrainsurgeonError as e:
            typer.echo(f"error: {cli_message(str(e), options)}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


@contextlib.contextmanager
def _cli_warnings(quiet: bool):
    """The library's warnings (data truncated, layers not pruned, caps) as one ``note:`` line each on
    stderr, in CLI spelling; none with ``--quiet``."""
    def show(message, category, filename, lineno, file=None, line=None):
        typer.echo(f"note: {cli_message(str(message))}", err=True)

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        else:
            warnings.showwarning = show
        yield


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
    """The model of ``--model``: the file's spec is data; code runs only for a ``--factory`` the user names.

    A user-named factory is imported with the current directory on ``sys.path`` (as ``python -m``
    does), so ``--factory mymodel:make`` finds ``./mymodel.py``; a file's spec never gets that.
    """
    from ..io import load_model

    spec = _factory_spec(factory, factory_kwargs)
    if spec is not None and "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    kwargs = spec["kwargs"] if spec is not None and factory_kwargs is not None else None
    model = load_model(model_path, factory=factory, factory_kwargs=kwargs)
    return model, model.brainsurgeon_spec


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_out_file(out: Path, force: bool, inputs: list[Path]) -> None:
    """An output file may replace an existing one only with ``--force``, and never an input; its
    directory must be writable (checked before any work)."""
    from ..outputs import check_output

    check_output(out, force=force, inputs=inputs)


def _check_out_dir(out: Path, force: bool, outputs: list[str], inputs: list[Path]) -> None:
    """``--out DIR``: refused if it is non-empty (unless ``--force``), is a file, would overwrite an
    input, or cannot be written (checked before any work)."""
    from ..outputs import check_output

    check_output(out, force=force, inputs=inputs, outputs=outputs)


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
    from ..outputs import reported_writes

    with reported_writes(out):
        save_weights(model.cpu(), out, spec, extra={"brainsurgeon.test_accuracy": metrics["accuracy"]})
    typer.echo(
        f"{arch} on {ds.name}: test accuracy {_fmt_acc(metrics['accuracy'])}, loss {metrics['loss']:.4f} "
        f"({metrics['samples']} samples); wrote {out}"
    )


# ----------------------------------------------------------------------------- prune


@app.command("prune")
@_handle_errors
def prune_cmd(
    method: Annotated[str, typer.Option(help="a registered method (see `brainsurgeon methods`)")],
    out: Annotated[Path, typer.Option("--out", help="output directory: model.safetensors and report.json")],
    model: Annotated[Optional[Path], typer.Option("--model", help="weights (.safetensors with spec, or with --factory any torch file)")] = None,
    data: Annotated[Optional[str], typer.Option(help="calibration data: digits, fashion-mnist, or a .npz/.safetensors file")] = None,
    hf: Annotated[Optional[Path], typer.Option("--hf", help="a saved transformers causal LM directory (instead of --model/--data; needs --text)")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="with --hf: calibration text (UTF-8); its last --holdout part is held back for evaluation")] = None,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="with --hf: evaluation text (then all of --text calibrates)")] = None,
    seq_len: Annotated[int, typer.Option(help="with --hf: tokens per calibration/evaluation window")] = 512,
    eval_windows: Annotated[int, typer.Option(help="with --hf: windows of the evaluation text for the perplexity")] = 40,
    holdout: Annotated[float, typer.Option(help="with --hf and no --eval-text: fraction of the text held back")] = 0.1,
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
    num_samples: Annotated[Optional[int], typer.Option(help="calibration samples (from the training split; default 1024), or with --hf token windows (default 128)")] = None,
    damping: Annotated[Optional[float], typer.Option(help="relative damping of curvature inverses")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="layer name pattern to prune (repeatable)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="layer name pattern to leave dense (repeatable)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="method option key=value (repeatable)")] = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 128,
    force: Annotated[bool, typer.Option(help="write into --out even if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars and no summary table")] = False,
    offload: Annotated[Optional[str], typer.Option(help="with --hf: 'disk' prunes the directory block by block, never loading it whole")] = None,
    offload_activations: Annotated[bool, typer.Option(help="with --offload disk: the cached activations in files on disk")] = False,
    resume: Annotated[bool, typer.Option(help="with --offload disk: continue an interrupted run from its last finished block")] = False,
) -> None:
    """Prune a model and write DIR/model.safetensors and DIR/report.json (with --hf: an HF directory).

    Several processes: ``torchrun --nproc-per-node P -m brainsurgeon prune --hf DIR ...``."""
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
    if hf is not None:  # a transformers model calibrated on text: cli/hf.py
        return _prune_hf(hf, text, eval_text, method, sparsity, out, structure, allocation, max_layer_sparsity,
                         num_samples, seq_len, eval_windows, holdout, damping, layers, method_options, seed, device,
                         force, quiet, compact, offload, offload_activations, resume)
    if offload is not None or offload_activations or resume:
        raise BrainsurgeonError("--offload, --offload-activations and --resume are for --hf DIR (an HF directory)")
    if text is not None or eval_text is not None:
        raise BrainsurgeonError("--text and --eval-text are for a transformers model: give --hf DIR with them")
    if model is None or data is None:
        raise BrainsurgeonError("give --model FILE and --data NAME (or --hf DIR --text FILE for a transformers model)")
    num_samples = 1024 if num_samples is None else num_samples
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
    from ..outputs import staged_dir

    with staged_dir(out) as tmp:  # all of it written beside --out first, then renamed into place
        # a compact (structured) model carries the spec of its smaller layers
        save_weights(res.model.cpu(), tmp / "model.safetensors", getattr(res.model, "brainsurgeon_spec", spec),
                     extra={"brainsurgeon.method": method})
        write_json(tmp / "report.json", report)
    if not quiet:
        _print_prune_summary(report, out)


def _prune_hf(hf, text, eval_text, method, sparsity, out, structure, allocation, max_layer_sparsity, num_samples,
              seq_len, eval_windows, holdout, damping, layers, method_options, seed, device, force, quiet,
              compact, offload=None, offload_activations=False, resume=False) -> None:
    from ..distributed import is_writer
    from .hf import prune_hf

    if structure == "channel":
        method_options = {**method_options, "compact": compact}

    report = prune_hf(
        hf_dir=hf, text=text, eval_text=eval_text, method=method, sparsity=sparsity, out=out, structure=structure,
        allocation=allocation, max_layer_sparsity=max_layer_sparsity, num_samples=128 if num_samples is None else num_samples,
        seq_len=seq_len, eval_windows=eval_windows, holdout=holdout, damping=damping, layers=layers,
        method_options=method_options, seed=seed, device=device, force=force, offload=offload,
        offload_activations=offload_activations, resume=resume,
    )
    if offload is not None and not quiet and is_writer():
        ov = report["overall"]
        typer.echo(f"{method}: sparsity {_fmt_sparsity(ov['achieved_sparsity'])} of {ov['numel']} weights, "
                   f"pruned block by block; wrote {out}")
    elif not quiet and is_writer():
        ov, ev = report["overall"], report["evaluation"]
        typer.echo(
            f"{method}: sparsity {_fmt_sparsity(ov['achieved_sparsity'])} of {ov.get('numel', ov.get('prunable_params'))} weights; perplexity "
            f"{ev['perplexity_before']:.3f} -> {ev['perplexity_after']:.3f} ({ev['windows']} windows of {ev['seq_len']} "
            f"tokens, {ev['text']}); wrote {out}"
        )


def _recalibrate_choice(value: str) -> bool | str:
    choices = {"auto": "auto", "yes": True, "no": False}
    if value not in choices:
        raise BrainsurgeonError(f"--recalibrate-bn must be auto, yes or no; got {value!r}")
    return choices[value]


def _print_prune_summary(report: dict, out: Path) -> None:
    ov, ev = report["overall"], report["evaluation"]
    # EigenDamage's report has no allocation key: it always allocates globally
    table = Table(title=f"{report['method']} at {report['options']['structure']} / {report['options'].get('allocation', 'global')}")
    table.add_column("layer")
    table.add_column("weights", justify="right")
    table.add_column("target sparsity", justify="right")
    table.add_column("achieved sparsity", justify="right")
    if report["options"]["structure"] in ("channel", "eigenbasis"):
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
    if report["options"]["structure"] == "eigenbasis":  # EigenDamage: layers replaced by eigenbasis forms
        table.columns[1].header, table.columns[2].header, table.columns[3].header = "weights", "form", "weights after"
        for name, lr in report["layers"].items():
            table.add_row(name, str(lr["weights_before"]), lr["form"], str(lr["weights_after"]))
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
    model: Annotated[Optional[Path], typer.Option("--model", help="weights (.safetensors with spec, or with --factory any torch file)")] = None,
    data: Annotated[str, typer.Option(help="digits, fashion-mnist, or a .npz/.safetensors file")] = "digits",
    hf: Annotated[Optional[Path], typer.Option("--hf", help="a saved transformers causal LM directory (instead of --model; needs --text)")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="with --hf: the text whose perplexity is measured (UTF-8)")] = None,
    seq_len: Annotated[int, typer.Option(help="with --hf: tokens per window")] = 512,
    eval_windows: Annotated[int, typer.Option(help="with --hf: at most this many windows, from the start of the text")] = 40,
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

    if hf is not None:  # a transformers model: perplexity on text (cli/hf.py)
        return _evaluate_hf(hf, text, seq_len, eval_windows, device, as_json)
    if text is not None:
        raise BrainsurgeonError("--text is for a transformers model: give --hf DIR with it")
    if model is None:
        raise BrainsurgeonError("give --model FILE (or --hf DIR --text FILE for a transformers model)")
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


def _evaluate_hf(hf, text, seq_len, eval_windows, device, as_json) -> None:
    from .hf import evaluate_hf

    metrics = evaluate_hf(hf_dir=hf, text=text, seq_len=seq_len, eval_windows=eval_windows, device=device)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(
        f"{text}: perplexity {metrics['perplexity']:.4f} ({metrics['windows']} windows of {seq_len} tokens); "
        f"block linears {100 * metrics['sparsity']:.2f}% zero"
    )
