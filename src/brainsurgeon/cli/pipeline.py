"""The pipeline commands: ``run`` (a YAML recipe, resumable) and ``compare`` (methods x sparsities)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import BrainsurgeonError
from . import app
from . import cli_message as _cli_message
from .core import _check_out_dir, _console, _handle_errors, _load

# the compare options an engine message may name in Python spelling (structure='channel')
COMPARE_OPTIONS = ("structure", "allocation", "device", "num_samples", "seed", "finetune_epochs", "finetune_lr")


def cli_message(text: str) -> str:
    return _cli_message(text, COMPARE_OPTIONS)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise BrainsurgeonError(f"{what} must be numbers separated by commas, e.g. 0.5,0.9; got {text!r}") from e
    if not values:
        raise BrainsurgeonError(f"{what} is empty")
    return values


@app.command("run")
@_handle_errors
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    resume: Annotated[bool, typer.Option(help="continue from the last completed round of an interrupted run")] = False,
    force: Annotated[bool, typer.Option(help="write into the recipe's output directory even if it is not empty")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress and no summary")] = False,
    allow_factory: Annotated[bool, typer.Option(help="let the recipe's model.factory import and run the code it names")] = False,
) -> None:
    """Run a recipe: prune (schedule, fine-tuning), checkpoint every round, write model, report and plots."""
    from ..recipe import FINETUNE_KEYS, TOP_KEYS, load_recipe, run_recipe

    rec = None
    try:
        rec = load_recipe(recipe, allow_factory=allow_factory)
        report = run_recipe(rec, resume=resume, force=force, progress=False if quiet else None)
    except BrainsurgeonError as e:  # the engine's structure='channel' in the recipe's spelling: structure: channel
        raise BrainsurgeonError(_cli_message(str(e), [*TOP_KEYS, *FINETUNE_KEYS], yaml=True)) from None
    except KeyboardInterrupt:
        from ..recipe import staging_dir

        partial = staging_dir(rec.output) if rec is not None else None
        if partial is not None and (partial / "checkpoint").is_dir():
            typer.echo(f"interrupted: the completed rounds are in {partial}; continue with --resume", err=True)
        raise typer.Exit(130) from None
    if not quiet:
        ev = report["evaluation"]
        _console().print(
            f"{report['method']}: sparsity {report['overall']['achieved_sparsity']:.4f}, test accuracy "
            f"{100 * ev['accuracy_before']:.2f}% -> {100 * ev['accuracy_after']:.2f}%; wrote {rec.output}/report.md",
            soft_wrap=True,  # a path is never broken across lines
        )


@app.command("compare")
@_handle_errors
def compare_cmd(
    model: Annotated[Path, typer.Option("--model", help="weights (.safetensors with spec, or with --factory)")],
    data: Annotated[str, typer.Option(help="digits, fashion-mnist, or a .npz/.safetensors file")],
    methods: Annotated[str, typer.Option(help="comma-separated methods, e.g. magnitude,obd")],
    sparsities: Annotated[str, typer.Option(help="comma-separated sparsities, e.g. 0.5,0.9")],
    out: Annotated[Path, typer.Option("--out", help="output directory: report.json, report.md, accuracy_vs_sparsity.png")],
    factory: Annotated[Optional[str], typer.Option(help="package.module:function that builds the model")] = None,
    factory_kwargs: Annotated[Optional[str], typer.Option(help="JSON object of the factory's keyword arguments")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="directory of the Fashion-MNIST idx files")] = None,
    finetune_epochs: Annotated[float, typer.Option(min=0.0, help="also fine-tune each cell for this many epochs (0: one-shot only)")] = 0.0,
    finetune_lr: Annotated[float, typer.Option(help="fine-tuning learning rate")] = 1e-3,
    structure: Annotated[str, typer.Option(help="unstructured, N:M (e.g. 2:4), or channel (whole units)")] = "unstructured",
    allocation: Annotated[str, typer.Option(help="uniform, global or sensitivity")] = "uniform",
    num_samples: Annotated[int, typer.Option(help="calibration samples")] = 1024,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    force: Annotated[bool, typer.Option(help="write into --out even if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress and no table")] = False,
) -> None:
    """Compare methods at several sparsities: a table (report.md) and a plot of accuracy against sparsity.

    Exits 2 when every cell was refused (nothing was compared)."""
    from ..data import load_dataset
    from ..evaluate import evaluate
    from ..finetune import FineTune
    from ..outputs import staged_dir
    from ..registry import methods as registered
    from ..reports import compare_methods, write_comparison

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in registered()]
    if not names or unknown:
        raise BrainsurgeonError(f"--methods: unknown {unknown or names}; registered: {', '.join(registered())}")
    levels = _floats(sparsities, "--sparsities")
    inputs = [model] + ([Path(data)] if Path(data).suffix in (".npz", ".safetensors") else [])
    _check_out_dir(out, force, ["report.json", "report.md", "accuracy_vs_sparsity.png"], inputs)
    if not model.exists():
        raise BrainsurgeonError(f"--model {model} does not exist")
    net, _ = _load(model, factory, factory_kwargs)
    ds = load_dataset(data, data_dir)
    ft = None
    if finetune_epochs > 0:
        ft = FineTune(ds.train, epochs=finetune_epochs, lr=finetune_lr, seed=seed, device=device,
                      progress=False if quiet else None)
    dense = evaluate(net, ds.test, device=device)
    console = _console(quiet)
    results = compare_methods(
        net, ds, names, levels, finetune=ft, num_samples=num_samples, seed=seed, allocation=allocation,
        structure=structure, device=device, progress=False if quiet else None,
        on_result=lambda c: console.print(
            f"{c['method']} {c['variant'] or ''} {c['sparsity']:g}: "
            + (f"refused ({cli_message(c['error'])})" if c.get("error") else f"{100 * c['accuracy']:.2f}%")
        ),
    )
    if all(c.get("error") for c in results):
        first = results[0]
        raise BrainsurgeonError(
            f"every cell was refused, nothing to compare; e.g. {first['method']} at {first['sparsity']:g}: "
            f"{cli_message(first['error'])}"
        )
    title = f"{model.name} on {ds.name}: test accuracy after pruning"
    with staged_dir(out) as tmp:  # all of it written beside --out first, then renamed into place
        write_comparison(tmp, title, results, levels, {"accuracy": dense["accuracy"], "loss": dense["loss"]},
                         {"finetune": None if ft is None else ft.options(), "allocation": allocation,
                          "structure": structure, "device": device})
    console.print(f"wrote {out / 'report.md'} and {out / 'accuracy_vs_sparsity.png'}", soft_wrap=True)
