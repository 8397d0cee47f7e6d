"""The demo (``make demo`` / ``python -m brainsurgeon.demo``): one-shot pruning of LeNet-300-100 on digits.

Trains LeNet-300-100 on scikit-learn's bundled 8x8 digits for a few seconds, then prunes the same
trained network one-shot (no fine-tuning) with every main registered method at several sparsities
with uniform allocation, and prints test accuracy and wall-clock time per cell. Writes
``report.json`` and ``report.md`` to ``--out`` (default ``runs/demo``), atomically.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import brainsurgeon as bs
from brainsurgeon.data import load_digits
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.io import write_json, write_text
from brainsurgeon.models import build_model, make_spec
from brainsurgeon.progress import progress_enabled
from brainsurgeon.train import train_model

# The methods the demo compares, in the order of the table (those registered are used).
MAIN_METHODS = ("magnitude", "random", "obd", "kfac-obd", "kfac-obs", "woodfisher", "obc", "sparsegpt", "wanda")
SPARSITIES = (0.5, 0.8, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m brainsurgeon.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for report.json and report.md")
    p.add_argument("--quiet", action="store_true", help="print only the path of the report")
    p.add_argument("--methods", default=",".join(MAIN_METHODS), help="comma-separated methods (registered ones are run)")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated sparsities")
    p.add_argument("--epochs", type=int, default=30, help="training epochs on digits")
    p.add_argument("--num-samples", type=int, default=512, help="calibration samples for each method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the demo's matrices are small, and on a busy machine extra "
        "OpenMP threads spin-wait; measured 46 s -> 8.5 s for the training on 2 busy cores)",
    )
    return p.parse_args(argv)


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise BrainsurgeonError(f"--sparsities must be numbers separated by commas, got {text!r}") from e
    if not values:
        raise BrainsurgeonError("--sparsities is empty")
    return values


def _methods(text: str) -> tuple[list[str], list[str]]:
    """The requested methods that are registered, and those that are not."""
    asked = [m.strip() for m in text.split(",") if m.strip()]
    registered = bs.methods()
    return [m for m in asked if m in registered], [m for m in asked if m not in registered]


def train_reference(epochs: int, seed: int, progress: bool):
    """LeNet-300-100 (64-300-100-10 on 8x8 inputs) trained with Adam; returns (model, spec, data, seconds)."""
    ds = load_digits(seed=seed)
    spec = make_spec("lenet300", input_shape=ds.input_shape, num_classes=ds.num_classes)
    torch.manual_seed(seed)
    model = build_model(spec)
    t0 = time.perf_counter()
    train_model(model, ds.train, epochs=epochs, lr=3e-3, batch_size=64, seed=seed, progress=progress)
    return model, spec, ds, time.perf_counter() - t0


def run_cell(model, ds, method: str, sparsity: float, num_samples: int, seed: int, progress: bool) -> dict:
    """Prune one copy of ``model`` and measure it; a refusal (bad input, memory budget) is recorded, not hidden."""
    t0 = time.perf_counter()
    try:
        res = bs.prune(model, ds.train, method, sparsity, num_samples=num_samples, seed=seed, progress=progress)
    except BrainsurgeonError as e:
        return {"method": method, "sparsity": sparsity, "error": str(e)}
    seconds = time.perf_counter() - t0
    metrics = evaluate(res.model, ds.test)
    return {
        "method": method,
        "sparsity": sparsity,
        "achieved_sparsity": res.report["overall"]["achieved_sparsity"],
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "seconds": seconds,
        "timings": res.report["timings"],
        "fallbacks": res.report["numerics"]["fallbacks"],
    }


def _cell_text(cell: dict) -> str:
    if "error" in cell:
        return "refused"
    return f"{100 * cell['accuracy']:.1f}% ({cell['seconds']:.2f} s)"


def results_table(methods: list[str], sparsities: list[float], cells: dict, dense_acc: float) -> Table:
    table = Table(title=f"LeNet-300-100 on digits, one-shot, uniform (dense: {100 * dense_acc:.1f}%)")
    table.add_column("method", style="bold")
    for s in sparsities:
        table.add_column(f"sparsity {s:g}", justify="right")
    for m in methods:
        table.add_row(m, *(_cell_text(cells[m, s]) for s in sparsities))
    return table


def results_markdown(report: dict) -> str:
    sparsities = report["sparsities"]
    lines = [
        "# brainsurgeon demo: one-shot pruning of LeNet-300-100 on digits",
        "",
        f"Dense test accuracy {100 * report['dense']['accuracy']:.2f}% on {report['dense']['test_samples']} test "
        f"images after {report['dense']['train_seconds']:.1f} s of training. Each cell prunes the same trained "
        f"network with uniform allocation ({report['num_samples']} calibration samples, no fine-tuning): "
        "test accuracy (wall-clock seconds of `bs.prune`).",
        "",
        "| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    by_key = {(c["method"], c["sparsity"]): c for c in report["results"]}
    for m in report["methods"]:
        lines.append(f"| {m} | " + " | ".join(_cell_text(by_key[m, s]) for s in sparsities) + " |")
    refused = [c for c in report["results"] if "error" in c]
    if refused:
        lines += ["", "Refused cells:", ""] + [f"- {c['method']} at {c['sparsity']:g}: {c['error']}" for c in refused]
    if report["missing_methods"]:
        lines += ["", "Not registered in this install: " + ", ".join(report["missing_methods"])]
    lines += ["", f"Machine: {report['machine']}; total {report['total_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=False, quiet=args.quiet)
    try:
        sparsities = _sparsities(args.sparsities)
        methods, missing = _methods(args.methods)
        if not methods:
            raise BrainsurgeonError(f"none of the methods {args.methods!r} is registered; see `brainsurgeon methods`")
        if args.threads < 1:
            raise BrainsurgeonError(f"--threads must be a positive integer, got {args.threads}")
    except BrainsurgeonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    progress = progress_enabled(None) and not args.quiet
    t_start = time.perf_counter()

    model, spec, ds, train_s = train_reference(args.epochs, args.seed, progress)
    dense = evaluate(model, ds.test)
    console.print(f"trained LeNet-300-100 on digits in {train_s:.1f} s: test accuracy {100 * dense['accuracy']:.2f}%")

    cells = {}
    for m in methods:
        for s in sparsities:
            cells[m, s] = run_cell(model, ds, m, s, args.num_samples, args.seed, progress)
            if "error" in cells[m, s]:
                console.print(f"[yellow]{m} at {s:g} refused:[/yellow] {cells[m, s]['error']}")
    total_s = time.perf_counter() - t_start

    report = {
        "model": spec,
        "data": "digits (scikit-learn, 8x8)",
        "dense": {"accuracy": dense["accuracy"], "loss": dense["loss"], "test_samples": dense["samples"],
                  "train_seconds": train_s, "epochs": args.epochs},
        "methods": methods,
        "missing_methods": missing,
        "sparsities": sparsities,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "results": [cells[m, s] for m in methods for s in sparsities],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "total_seconds": total_s,
    }
    write_json(args.out / "report.json", report)
    write_text(args.out / "report.md", results_markdown(report))
    console.print(results_table(methods, sparsities, cells, dense["accuracy"]))
    if missing:
        console.print(f"not registered in this install: {', '.join(missing)}")
    console.print(f"total {total_s:.1f} s; wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    if args.quiet:
        print(args.out / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
