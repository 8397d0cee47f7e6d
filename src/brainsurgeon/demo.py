"""The demo (``make demo`` / ``python -m brainsurgeon.demo``): the whole pipeline on LeNet-300-100.

Trains LeNet-300-100 (on Fashion-MNIST when its idx files are installed in
/usr/share/datasets/fashion-mnist, otherwise on scikit-learn's bundled 8x8 digits), then prunes the
same trained network with the main registered methods at several sparsities, one-shot and then
with a short fine-tuning (masks held), and prints test accuracy per cell. Then it shows the other
pipeline pieces on one method: per-layer sensitivity curves, and a gradual schedule (Zhu & Gupta)
with fine-tuning between rounds. Writes to ``--out`` (default ``runs/demo``): ``report.json``,
``report.md``, ``accuracy_vs_sparsity.png``, ``sensitivity.png`` and ``gradual/`` (the schedule's
report with its per-layer sparsity and per-round plots).
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
from brainsurgeon.data import fashion_mnist_available, load_digits, load_fashion_mnist
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.io import write_json, write_text
from brainsurgeon.models import build_model, make_spec
from brainsurgeon.progress import progress_enabled
from brainsurgeon.reports import (
    compare_methods, comparison_markdown, plot_accuracy_vs_sparsity, plot_sensitivity, write_run_report,
)
from brainsurgeon.train import train_model

# The methods the demo compares, in the order of the table (those registered are used).
MAIN_METHODS = ("magnitude", "random", "obd", "kfac-obd", "woodfisher", "obc", "sparsegpt", "wanda")
# On Fashion-MNIST (784 inputs) these cost minutes per cell on 2 cores (measured at sparsity 0.9, 512
# samples, shared cores: woodfisher 82 s, obc > 200 s, kfac-obs 9.5 s): left out by default there;
# name them with --methods to include them.
SLOW_ON_FASHION = ("woodfisher", "obc", "kfac-obs")
SPARSITIES = (0.5, 0.8, 0.9)
# Training settings per data set: (epochs, lr, batch size); measured to train in seconds on 2 cores.
TRAINING = {"digits": (30, 3e-3, 64), "fashion-mnist": (3, 1e-3, 128)}
# Fine-tuning per cell: (epochs, lr); about 100 optimizer steps either way (digits has 1348 training images).
FINETUNE = {"digits": (10.0, 3e-3), "fashion-mnist": (1.0, 1e-3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m brainsurgeon.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--quiet", action="store_true", help="print only the path of the report")
    p.add_argument("--data", choices=("auto", "digits", "fashion-mnist"), default="auto",
                   help="auto: Fashion-MNIST when installed, else digits")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (registered ones are run); default: the main methods, less "
                   f"{', '.join(SLOW_ON_FASHION)} on Fashion-MNIST")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated sparsities")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default per data set)")
    p.add_argument("--finetune-epochs", type=float, default=None,
                   help="fine-tuning epochs per cell (0: one-shot only; default 10 on digits, 1 on Fashion-MNIST)")
    p.add_argument("--finetune-samples", type=int, default=10000, help="training samples used for fine-tuning")
    p.add_argument("--num-samples", type=int, default=512, help="calibration samples for each method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the demo's matrices are small, and when the cores are shared OpenMP "
        "threads spin-wait; measured on 2 shared cores: training 403.7 s with torch's default of 2 threads, "
        "13.9 s with 1)",
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


def load_data(choice: str, seed: int):
    if choice == "fashion-mnist" or (choice == "auto" and fashion_mnist_available()):
        return load_fashion_mnist()
    return load_digits(seed=seed)


def train_reference(ds, epochs: int | None, seed: int, progress: bool):
    """LeNet-300-100 trained with Adam; returns (model, spec, seconds, epochs)."""
    default_epochs, lr, batch = TRAINING[ds.name]
    epochs = default_epochs if epochs is None else epochs
    spec = make_spec("lenet300", input_shape=ds.input_shape, num_classes=ds.num_classes)
    torch.manual_seed(seed)
    model = build_model(spec)
    t0 = time.perf_counter()
    train_model(model, ds.train, epochs=epochs, lr=lr, batch_size=batch, seed=seed, progress=progress)
    return model, spec, time.perf_counter() - t0, epochs


def _cell(results, method, sparsity, variant) -> dict | None:
    for r in results:
        if r["method"] == method and r["sparsity"] == sparsity and r.get("variant") in (variant, None):
            return r
    return None


def _acc(cell) -> str:
    if cell is None:
        return "-"
    return "refused" if cell.get("error") else f"{100 * cell['accuracy']:.1f}%"


def results_table(title: str, methods, sparsities, results, finetuned: bool) -> Table:
    table = Table(title=title)
    table.add_column("method", style="bold")
    for s in sparsities:
        table.add_column(f"sparsity {s:g}" + (" one-shot -> fine-tuned" if finetuned else ""), justify="right")
    for m in methods:
        cells = []
        for s in sparsities:
            one = _acc(_cell(results, m, s, "one-shot"))
            cells.append(f"{one} -> {_acc(_cell(results, m, s, 'fine-tuned'))}" if finetuned else one)
        table.add_row(m, *cells)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=False, quiet=args.quiet)
    try:
        sparsities = _sparsities(args.sparsities)
        ds = None
        if args.methods is None:
            ds = load_data(args.data, args.seed)
            args.methods = ",".join(m for m in MAIN_METHODS if ds.name != "fashion-mnist" or m not in SLOW_ON_FASHION)
        methods, missing = _methods(args.methods)
        if not methods:
            raise BrainsurgeonError(f"none of the methods {args.methods!r} is registered; see `brainsurgeon methods`")
        if args.threads is not None and args.threads < 1:
            raise BrainsurgeonError(f"--threads must be a positive integer, got {args.threads}")
        if (args.finetune_epochs is not None and args.finetune_epochs < 0) or args.finetune_samples < 2:
            raise BrainsurgeonError("--finetune-epochs must be >= 0 and --finetune-samples >= 2")
    except BrainsurgeonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = progress_enabled(None) and not args.quiet
    t_start = time.perf_counter()

    ds = ds or load_data(args.data, args.seed)
    model, spec, train_s, epochs = train_reference(ds, args.epochs, args.seed, progress)
    dense = evaluate(model, ds.test)
    console.print(f"trained LeNet-300-100 on {ds.name} in {train_s:.1f} s: test accuracy {100 * dense['accuracy']:.2f}%")

    n_ft = min(args.finetune_samples, len(ds.x_train))
    ft_epochs, ft_lr = FINETUNE[ds.name]
    ft_epochs = ft_epochs if args.finetune_epochs is None else args.finetune_epochs
    ft = None
    if ft_epochs > 0:
        ft = bs.FineTune((ds.x_train[:n_ft], ds.y_train[:n_ft]), epochs=ft_epochs, lr=ft_lr, seed=args.seed)
    results = compare_methods(
        model, ds, methods, sparsities, finetune=ft, num_samples=args.num_samples, seed=args.seed, progress=progress,
        on_result=lambda c: c.get("error") and console.print(f"[yellow]{c['method']} at {c['sparsity']:g} refused:[/yellow] {c['error']}"),
    )
    compare_s = time.perf_counter() - t_start - train_s

    # The rest of the pipeline on one method: sensitivity curves and a gradual schedule.
    t0 = time.perf_counter()
    sens = bs.sensitivity(model, ds.train, "magnitude", ratios=[0.5, 0.8, 0.9, 0.95, 0.98], eval_data=ds.test,
                          num_samples=args.num_samples)
    plot_sensitivity(sens.to_dict(), args.out / "sensitivity.png")
    top = max(sparsities)
    gradual = None
    if ft is not None:
        gradual_ft = bs.FineTune((ds.x_train[:n_ft], ds.y_train[:n_ft]), epochs=2 * ft_epochs, lr=ft_lr, seed=args.seed)
        res = bs.prune(model, ds.train, "magnitude", top, allocation="sensitivity", schedule="gradual", steps=4,
                       finetune=gradual_ft, num_samples=args.num_samples, seed=args.seed, progress=progress)
        after = evaluate(res.model, ds.test)
        gradual = dict(res.report, evaluation={
            "split": f"{ds.name} test", "samples": after["samples"], "accuracy_before": dense["accuracy"],
            "accuracy_after": after["accuracy"], "loss_before": dense["loss"], "loss_after": after["loss"]})
        write_run_report(gradual, args.out / "gradual")
    pipeline_s = time.perf_counter() - t0
    total_s = time.perf_counter() - t_start

    title = f"LeNet-300-100 on {ds.name}: test accuracy after pruning (dense {100 * dense['accuracy']:.1f}%)"
    plot = plot_accuracy_vs_sparsity(results, args.out / "accuracy_vs_sparsity.png", dense["accuracy"], title).name
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    report = {
        "model": spec, "data": ds.name,
        "dense": {"accuracy": dense["accuracy"], "loss": dense["loss"], "test_samples": dense["samples"],
                  "train_seconds": train_s, "epochs": epochs},
        "methods": methods, "missing_methods": missing, "sparsities": sparsities, "num_samples": args.num_samples,
        "finetune": None if ft is None else ft.options(), "seed": args.seed, "results": results,
        "sensitivity": sens.to_dict(),
        "gradual": None if gradual is None else {
            "method": "magnitude", "sparsity": top, "allocation": "sensitivity",
            "accuracy": gradual["evaluation"]["accuracy_after"], "report": "gradual/report.md"},
        "machine": machine, "seconds": {"train": train_s, "compare": compare_s, "pipeline": pipeline_s, "total": total_s},
        "plots": {"accuracy vs sparsity": plot, "sensitivity": "sensitivity.png"},
    }
    md = comparison_markdown(title, results, sparsities, dense["accuracy"], plot)
    md += (
        f"\nCalibration: {args.num_samples} training samples per method. "
        + (f"Fine-tuning: {ft_epochs:g} epoch(s) of Adam (lr {ft_lr:g}) on {n_ft} training samples, masks held, "
           "best state on a 10% validation split.\n" if ft is not None else "No fine-tuning.\n")
        + "\n## Sensitivity (magnitude, one layer at a time, test split)\n\n![sensitivity](sensitivity.png)\n"
    )
    if gradual is not None:
        md += (f"\n## Gradual schedule\n\nmagnitude to {top:g} with sensitivity allocation, 4 rounds (Zhu & Gupta), "
               f"{gradual_ft.epochs:g} fine-tuning epochs in all: test accuracy "
               f"{100 * gradual['evaluation']['accuracy_after']:.2f}%. Details: [gradual/report.md](gradual/report.md).\n")
    if missing:
        md += f"\nNot registered in this install: {', '.join(missing)}.\n"
    md += f"\nMachine: {machine}; train {train_s:.1f} s, comparison {compare_s:.1f} s, pipeline {pipeline_s:.1f} s, total {total_s:.1f} s.\n"
    write_json(args.out / "report.json", report)
    write_text(args.out / "report.md", md)
    console.print(results_table(title, methods, sparsities, results, ft is not None))
    if gradual is not None:
        console.print(f"gradual magnitude to {top:g} (sensitivity allocation, fine-tuned): "
                      f"{100 * gradual['evaluation']['accuracy_after']:.2f}%")
    if missing:
        console.print(f"not registered in this install: {', '.join(missing)}")
    console.print(f"total {total_s:.1f} s; wrote {args.out / 'report.md'} and plots")
    if args.quiet:
        print(args.out / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
