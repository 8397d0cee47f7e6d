"""Run reports: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg backend: no display needed).

Plots: accuracy against sparsity per method (``compare``, the demo), per-layer sparsity bars (every
run), sensitivity curves (``allocation="sensitivity"`` or ``bs.sensitivity(...).plot``) and the
per-round accuracy of a schedule.
"""
from __future__ import annotations

from pathlib import Path

from .io import atomic_path, write_json, write_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _label(result: dict) -> str:
    """A table row / plot line: the method, marked when fine-tuned."""
    variant = result.get("variant")
    return result["method"] if variant in (None, "one-shot") else f"{result['method']} ({variant})"


def plot_accuracy_vs_sparsity(results: list[dict], path, dense_accuracy: float | None = None, title: str = "") -> Path:
    """One line per (method, variant): test accuracy against sparsity. ``results``: dicts with
    ``method``, ``sparsity``, ``accuracy`` and optionally ``variant`` (e.g. "fine-tuned")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.get("accuracy") is None:
            continue
        series.setdefault(_label(r), []).append((r["sparsity"], 100 * r["accuracy"]))
    # one colour per method (its variants share it; the line style tells them apart), from a
    # 20-colour map so that no two methods share a colour
    methods = list(dict.fromkeys(r["method"] for r in results if r.get("accuracy") is not None))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    method_of = {_label(r): r["method"] for r in results}
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colour[method_of[label]],
                linestyle="--" if "fine-tuned" in label else "-")
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="black", linewidth=0.8, linestyle=":", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_layer_sparsity(report: dict, path) -> Path:
    """Bars of target and achieved sparsity per layer."""
    plt = _pyplot()
    layers = report["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 4))
    xs = range(len(names))
    achieved = [layers[n]["achieved_sparsity"] for n in names]
    target = [layers[n].get("target_sparsity") if layers[n].get("target_sparsity") is not None else float("nan") for n in names]
    ax.bar([x - 0.2 for x in xs], target, width=0.4, label="target")
    ax.bar([x + 0.2 for x in xs], achieved, width=0.4, label="achieved")
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(f"per-layer sparsity ({report.get('method', '')}, overall {report['overall']['achieved_sparsity']:.3f})")
    ax.legend()
    return _save(fig, path)


def plot_sensitivity(sens: dict, path) -> Path:
    """Loss and accuracy against each layer's pruning ratio (one line per layer)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in sens["curves"].items():
        xs = [0.0] + [p["ratio"] for p in curve]
        ax1.plot(xs, [sens["base"]["loss"]] + [p["loss"] for p in curve], marker="o", label=name)
        ax2.plot(xs, [100 * sens["base"]["accuracy"]] + [100 * p["accuracy"] for p in curve], marker="o", label=name)
    ax1.set_xlabel("layer pruning ratio")
    ax1.set_ylabel("loss")
    ax2.set_xlabel("layer pruning ratio")
    ax2.set_ylabel("accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"sensitivity: one layer pruned at a time ({sens['method']})")
    return _save(fig, path)


def plot_rounds(report: dict, path) -> Path:
    """Sparsity and best validation accuracy after each round of a schedule."""
    plt = _pyplot()
    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["round"] for r in rounds]
    ax.plot(ks, [r["achieved_sparsity"] for r in rounds], marker="o", label="sparsity")
    accs = [((r.get("finetune") or {}).get("best") or {}).get("val_accuracy") for r in rounds]
    if any(a is not None for a in accs):
        ax.plot(ks, [a if a is not None else float("nan") for a in accs], marker="s", label="val accuracy (best)")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report['schedule']['name']} schedule")
    return _save(fig, path)


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else (f"{v:.4f}" if isinstance(v, float) else str(v))


def run_markdown(report: dict, plots: dict[str, str]) -> str:
    """The report of one run as Markdown."""
    o = report["overall"]
    lines = [f"# brainsurgeon run: {report['method']}", ""]
    ev = report.get("evaluation")
    if ev:
        lines += [f"Test accuracy ({ev['split']}, {ev['samples']} samples): {_fmt(ev['accuracy_before'], True)} dense -> "
                  f"{_fmt(ev['accuracy_after'], True)} pruned; loss {ev['loss_before']:.4f} -> {ev['loss_after']:.4f}.", ""]
    if report["options"]["structure"] == "channel":
        lines += [f"Units removed: target {_fmt(o['target_sparsity'])}, achieved {_fmt(o['achieved_sparsity'])} "
                  f"({o['removed_units']} of {o['units']} units). Allocation: {report['options']['allocation']}, "
                  "structure: channel.", ""]
    else:
        lines += [f"Sparsity: target {_fmt(o['target_sparsity'])}, achieved {_fmt(o['achieved_sparsity'])} "
                  f"({o['zeros']} of {o['numel']} weights). Allocation: {report['options']['allocation']}, "
                  f"structure: {report['options']['structure']}.", ""]
    sched = report.get("schedule")
    if sched:
        lines += [f"Schedule: {sched['name']} ({sched['spacing']}), {sched['rounds']} round(s)"
                  + (f", resumed after round {sched['resumed_from_round']}" if sched.get("resumed_from_round") else "") + ".", ""]
        lines += ["| round | target | achieved | fine-tune steps | best val acc | val loss |", "|---|---|---|---|---|---|"]
        for r in report["rounds"]:
            ft = r.get("finetune") or {}
            best = ft.get("best") or {}
            lines.append(f"| {r['round']} | {r['target_sparsity']:.4f} | {r['achieved_sparsity']:.4f} | {ft.get('steps', 0)} | "
                         f"{_fmt(best.get('val_accuracy'), True)} | {_fmt(best.get('val_loss'))} |")
        lines.append("")
    if report.get("finetune"):
        f = report["finetune"]
        lines += [f"Fine-tuning: {f['optimizer']} lr {f['lr']}, {f['epochs']} epoch(s) in all ({f['total_steps']} steps), "
                  f"validation: {f['validation']}, best state by {f['select']}.", ""]
    if report["options"]["structure"] == "channel":
        lines += ["| layer | shape before | shape after |", "|---|---|---|"]
        for name, lr in report["layers"].items():
            lines.append(f"| {name} | {'x'.join(map(str, lr['shape_before']))} | {'x'.join(map(str, lr['shape_after']))} |")
    else:
        lines += ["| layer | shape | target | achieved |", "|---|---|---|---|"]
        for name, lr in report["layers"].items():
            lines.append(f"| {name} | {'x'.join(map(str, lr['shape']))} | {_fmt(lr.get('target_sparsity'))} | {_fmt(lr['achieved_sparsity'])} |")
    fb = report.get("numerics", {}).get("fallbacks") or []
    if fb:
        lines += ["", "Numerical fallbacks:", ""] + [f"- {x}" for x in fb]
    t = report.get("timings", {})
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())]
    if plots:
        lines += [""] + [f"![{k}]({v})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


def write_run_report(report: dict, out) -> dict[str, str]:
    """``report.json``, ``report.md`` and the plots of one run into ``out``; returns the plot paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if report["options"]["structure"] != "channel":  # a structured run's layers change shape: its table says it
        plots["layer sparsity"] = plot_layer_sparsity(report, out / "layer_sparsity.png").name
    if report.get("rounds") and len(report["rounds"]) > 1:
        plots["rounds"] = plot_rounds(report, out / "rounds.png").name
    if report.get("sensitivity"):
        plots["sensitivity"] = plot_sensitivity(report["sensitivity"], out / "sensitivity.png").name
    report = dict(report, plots=plots)
    write_json(out / "report.json", report)
    write_text(out / "report.md", run_markdown(report, plots))
    return plots


def comparison_markdown(title: str, results: list[dict], sparsities: list[float], dense_accuracy: float, plot: str | None) -> str:
    """A table method x sparsity of test accuracy (one row per method and variant)."""
    rows: dict[str, dict] = {}
    for r in results:
        rows.setdefault(_label(r), {})[r["sparsity"]] = r
    lines = [f"# {title}", "", f"Dense test accuracy: {100 * dense_accuracy:.2f}%.", "",
             "| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    for label, cells in rows.items():
        texts = []
        for s in sparsities:
            c = cells.get(s)
            if c is None:
                texts.append("-")
            elif c.get("error"):
                texts.append("refused")
            else:
                texts.append(f"{100 * c['accuracy']:.1f}% ({c['seconds']:.1f} s)")
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    refused = [r for r in results if r.get("error")]
    if refused:
        lines += ["", "Refused:", ""] + [f"- {r['method']} at {r['sparsity']:g}: {r['error']}" for r in refused]
    if plot:
        lines += ["", f"![accuracy vs sparsity]({plot})"]
    return "\n".join(lines) + "\n"


def compare_methods(model, ds, methods, sparsities, *, finetune=None, num_samples: int = 1024, seed: int = 0,
                    progress=None, on_result=None, **prune_options) -> list[dict]:
    """Prune ``model`` with every method at every sparsity: test accuracy and seconds one-shot, and, with
    ``finetune`` (a :class:`~brainsurgeon.finetune.FineTune`), after fine-tuning that pruned model with its
    masks held (the same as ``bs.prune(..., finetune=ft)``, without pruning twice). A refusal (bad input,
    memory budget) is recorded, not hidden."""
    import time

    from .engine import prune
    from .errors import BrainsurgeonError
    from .evaluate import evaluate
    from .finetune import finetune as finetune_model

    def emit(cell):
        results.append(cell)
        if on_result is not None:
            on_result(cell)

    results: list[dict] = []
    for method in methods:
        for s in sparsities:
            base = {"method": method, "sparsity": s, "variant": "one-shot" if finetune is not None else None}
            t0 = time.perf_counter()
            try:
                res = prune(model, ds.train, method, s, num_samples=num_samples, seed=seed, progress=progress, **prune_options)
            except BrainsurgeonError as e:
                emit(dict(base, error=str(e)))
                if finetune is not None:
                    emit(dict(base, variant="fine-tuned", error=str(e)))
                continue
            prune_s = time.perf_counter() - t0
            device = prune_options.get("device", "cpu")
            m = evaluate(res.model, ds.test, device=device)
            common = {"achieved_sparsity": res.report["overall"]["achieved_sparsity"],
                      "fallbacks": res.report["numerics"]["fallbacks"]}
            emit(dict(base, accuracy=m["accuracy"], loss=m["loss"], seconds=prune_s, **common))
            if finetune is not None:
                t1 = time.perf_counter()
                # a compact structured model has other shapes than its masks: hold its exact zeros instead
                masks = None if prune_options.get("structure") == "channel" else res.masks
                tuned = finetune_model(res.model, masks=masks, config=finetune)
                m = evaluate(tuned, ds.test, device=device)
                emit(dict(base, variant="fine-tuned", accuracy=m["accuracy"], loss=m["loss"],
                          seconds=prune_s + time.perf_counter() - t1, **common))
    return results


def write_comparison(out, title: str, results: list[dict], sparsities: list[float], dense: dict, extra: dict | None = None) -> None:
    """``report.json``, ``report.md`` and ``accuracy_vs_sparsity.png`` of a comparison."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_accuracy_vs_sparsity(results, out / "accuracy_vs_sparsity.png", dense["accuracy"], title).name
    write_json(out / "report.json", {"title": title, "dense": dense, "sparsities": sparsities, "results": results,
                                     "plots": {"accuracy vs sparsity": plot}, **(extra or {})})
    write_text(out / "report.md", comparison_markdown(title, results, sparsities, dense["accuracy"], plot))
