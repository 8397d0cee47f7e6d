"""Structured (neuron / channel) pruning benchmarks, one-shot, no fine-tuning (``make bench-structured``).

1. LeNet-300-100 on Fashion-MNIST: both hidden layers lose 0.3 / 0.5 / 0.7 / 0.8 of their neurons,
   with every structured criterion and Torch-Pruning's MagnitudePruner (magnitude, Taylor and
   Hessian importances) in the same run.
2. SmallResNet on Fashion-MNIST: channel pruning to half the FLOPs with every criterion: accuracy,
   FLOPs ratio, measured CPU latency ratio at batch 1 and 64.
3. EigenDamage (K-FAC and EKFAC) and C-OBS against C-OBD and l1-norm on LeNet-5 at 0.5 and 0.7 of
   the parameters removed.

Usage: ``python benchmarks/structured.py [--parts 1,2,3] [--calib 1024]``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from torch import nn

from common import accuracy, calibration, dataset, dense_model  # noqa: E402  (sets sys.path)
from _record import markdown_table, record_section  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.errors import BrainsurgeonError  # noqa: E402
from brainsurgeon.structured.engine import structured_methods  # noqa: E402
from brainsurgeon.structured.latency import compare, count_flops  # noqa: E402

SECOND_ORDER = ["obd", "kfac-obs"]  # structure="channel" variants of the unstructured names


def criteria() -> list[str]:
    """Criteria that remove a ratio of units (EigenDamage removes weights in its eigenbasis: part 3)."""
    from brainsurgeon.registry import get_method
    from brainsurgeon.structured.groups import WholeModelMethod

    unit_methods = {m for m in structured_methods() if not issubclass(get_method(m), WholeModelMethod)}
    return sorted(unit_methods | set(SECOND_ORDER))


def prune(model, calib, method, ratio, **kw):
    t0 = time.perf_counter()
    res = bs.prune(model, calib, method=method, sparsity=ratio, structure="channel", num_samples=len(calib[0]), **kw)
    return res, time.perf_counter() - t0


# ----------------------------------------------------------------------------- Torch-Pruning peers
def torch_pruning(model, calib, importance: str, ratio: float, ignored):
    """Torch-Pruning's MagnitudePruner with one of its importances (the peer library)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    x, y = calib
    imp = {
        "tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=1),
        "tp-taylor": lambda: tp.importance.TaylorImportance(),
        "tp-hessian": lambda: tp.importance.HessianImportance(),
    }[importance]()
    pruner = tp.pruner.MagnitudePruner(
        m, example_inputs=x[:2], importance=imp, pruning_ratio=ratio, ignored_layers=[ignored(m)],
    )
    loss = nn.CrossEntropyLoss()
    if importance == "tp-taylor":
        m.zero_grad()
        loss(m(x), y).backward()
    elif importance == "tp-hessian":
        imp.zero_grad()
        for i in range(min(len(x), 256)):  # per-sample gradients, as its documentation shows
            m.zero_grad()
            loss(m(x[i : i + 1]), y[i : i + 1]).backward()
            imp.accumulate_grad(m)
    pruner.step()
    return m


# ----------------------------------------------------------------------------- parts
def part_lenet300(data, n_calib: int) -> str:
    model, _, _ = dense_model("lenet300", data, epochs=15)
    model.eval()
    calib = calibration(data, n_calib)
    dense = accuracy(model, data)
    ratios = [0.3, 0.5, 0.7, 0.8]
    rows, best = [], {}
    for method in criteria() + ["tp-magnitude", "tp-taylor", "tp-hessian"]:
        row = [method]
        for r in ratios:
            try:
                if method.startswith("tp-"):
                    acc = accuracy(torch_pruning(model, calib, method, r, lambda m: m.net[-1]), data)
                else:
                    acc = accuracy(prune(model, calib, method, r)[0].model, data)
            except BrainsurgeonError as e:
                row.append(f"n/a ({str(e)[:40]})")
                continue
            best[r] = max(best.get(r, 0), acc)
            row.append(f"{100 * acc:.2f}")
        rows.append(row)
        print(row, file=sys.stderr)
    table = markdown_table(["criterion"] + [f"acc % at {r}" for r in ratios], rows)
    verdict = (
        f"Dense accuracy {100 * dense:.2f}%. Best at 0.5: {100 * best.get(0.5, 0):.2f}% (loss "
        f"{100 * (dense - best.get(0.5, 0)):.2f} points, target <= 1); best at 0.7: {100 * best.get(0.7, 0):.2f}% "
        f"(loss {100 * (dense - best.get(0.7, 0)):.2f} points, target <= 3)."
    )
    return (
        "### 1. LeNet-300-100, Fashion-MNIST: neurons of both hidden layers removed, one-shot, no fine-tuning\n\n"
        f"Calibration: {n_calib} training samples; uniform allocation (each hidden layer loses the ratio).\n\n"
        + table + "\n\n" + verdict + "\n"
    )


RESNETS = [((32, 64, 128), "twice as wide as the default"), ((16, 32, 64), "the library's default SmallResNet")]
ROUND_TO = 16  # AVX-512 holds 16 floats: the channel block of this machine's convolution kernels


def part_resnet(data, n_calib: int) -> str:
    out = [
        "### 2. SmallResNet, Fashion-MNIST: channel pruning to half the FLOPs, one-shot\n\n"
        "Uniform allocation at the ratio that first removes half the FLOPs (bisection); then the same with "
        f"`round_to={ROUND_TO}` (every layer keeps a multiple of {ROUND_TO} channels: AVX-512 convolution kernels work "
        f"on blocks of 16 channels). Accuracy with the BatchNorm statistics as the default `recalibrate_bn=\"auto\"` "
        f"leaves them (re-estimated on the {n_calib} calibration samples where that lowers the calibration loss, "
        "else kept), always re-estimated, and as they were (the dense statistics of the kept channels). Speedup: median of "
        "per-round latency ratios dense / pruned, the two models timed interleaved (61 rounds or 4 s, "
        f"{torch.get_num_threads()} thread(s)).\n"
    ]
    verdicts = []
    for widths, why in RESNETS:
        section, verdict = _resnet_section(data, n_calib, widths, why)
        out.append(section)
        verdicts.append(verdict)
    return "\n".join(out) + "\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"


def _resnet_section(data, n_calib: int, widths, why: str) -> tuple[str, str]:
    from brainsurgeon.batchnorm import choose_batchnorm_statistics, recalibrate_batchnorm
    from brainsurgeon.data import Calibration

    model, _, _ = dense_model("resnet", data, epochs=3, widths=widths)
    model.eval()
    calib = calibration(data, n_calib)
    dense = accuracy(model, data)
    shape = tuple(data.x_train.shape[1:])
    example = torch.zeros(1, *shape)
    base_flops = count_flops(model, example)
    cal = Calibration.from_data(calib, n_calib)  # the batches bs.prune recalibrates on
    parts, verdicts = [], []
    for round_to in (None, ROUND_TO):
        # uniform allocation: the compact model's FLOPs depend on the unit counts only, not on the
        # criterion, so one bisection (with l1-norm) finds the ratio that halves the FLOPs for all
        ratio = _unit_ratio_for(model, calib, 0.5, lambda m: 1 - count_flops(m, example) / base_flops, round_to=round_to)
        rows, met, pruned_widths = [], [], None
        for method in criteria():
            try:
                res, secs = prune(model, calib, method, ratio, round_to=round_to, recalibrate_bn=False)
            except BrainsurgeonError as e:
                rows.append([method, f"n/a ({str(e)[:40]})", "", "", "", "", "", "", ""])
                continue
            acc_stale = accuracy(res.model, data)
            recal = copy.deepcopy(res.model)
            recalibrate_batchnorm(recal, cal)  # what recalibrate_bn=True does
            acc_recal = accuracy(recal, data)
            # what the default recalibrate_bn="auto" does: the statistics with the lower calibration loss
            auto = choose_batchnorm_statistics(res.model, cal, nn.CrossEntropyLoss(), "auto")
            acc = accuracy(res.model, data)
            before, after, speedup = compare(model, res.model, shape, rounds=61, budget_s=4.0)
            flops = before["flops"] / after["flops"]
            ok = speedup["batch_64"] >= 0.8 * flops
            met.append(ok)
            pruned_widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
            rows.append([method, f"{100 * acc:.2f} ({'re-estimated' if auto['recalibrated'] else 'kept'})",
                         f"{100 * acc_recal:.2f}", f"{100 * acc_stale:.2f}", f"{flops:.2f}",
                         f"{speedup['batch_1']:.2f}", f"{speedup['batch_64']:.2f}",
                         f"{speedup['batch_64'] / flops:.2f}", "yes" if ok else "no"])
            print(widths, round_to, rows[-1], file=sys.stderr)
        table = markdown_table(
            ["criterion", "acc % (default: BN statistics auto)", "acc % (BN re-estimated)", "acc % (BN as before)",
             "FLOPs ratio", "speedup b=1",
             "speedup b=64", "b=64 speedup / FLOPs ratio", ">= 0.8"], rows)
        label = "exact ratio" if round_to is None else f"round_to={round_to}"
        reached = rows and rows[0][4] and float(rows[0][4]) >= 2.0 - 1e-9
        parts.append(
            f"##### {label}: every group loses {ratio:.3f} of its channels"
            + (f", then keeps the nearest multiple of {round_to}" if round_to else "")
            + ("" if reached else " (half the FLOPs cannot be removed under this constraint: the most that can)")
            + f"; conv widths after: {pruned_widths}\n\n" + table + "\n"
        )
        verdicts.append(f"{label}: {sum(met)} of {len(met)} criteria")
    dense_widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    head = (
        f"#### SmallResNet widths {list(widths)} ({why}): dense accuracy {100 * dense:.2f}%, {base_flops} FLOPs per "
        f"sample, {sum(p.numel() for p in model.parameters())} parameters; conv widths {dense_widths}\n\n"
    )
    return head + "\n".join(parts), (
        f"widths {list(widths)}: speedup at batch 64 >= 0.8 x FLOPs ratio for " + "; ".join(verdicts)
    )


def part_lenet5(data, n_calib: int) -> str:
    model, _, _ = dense_model("lenet5", data, epochs=15)
    model.eval()
    calib = calibration(data, n_calib)
    dense = accuracy(model, data)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for target in (0.5, 0.7):
        for ekfac in (False, True):
            res = bs.prune(model, calib, "eigendamage", target, structure="channel", allocation="global",
                           ekfac=ekfac, num_samples=n_calib, max_layer_sparsity=0.95)
            after = sum(p.numel() for p in res.model.parameters())
            rows.append([f"eigendamage{' (EKFAC)' if ekfac else ''}", target, f"{1 - after / params:.3f}",
                         f"{100 * accuracy(res.model, data):.2f}"])
            print(rows[-1], file=sys.stderr)
        for method in ["kfac-obs", "obd", "l1-norm"]:
            ratio = _unit_ratio_for(model, calib, target, lambda m: 1 - sum(p.numel() for p in m.parameters()) / params)
            try:
                res, _ = prune(model, calib, method, ratio)
            except BrainsurgeonError as e:
                rows.append([method, target, "n/a", str(e)[:40]])
                continue
            after = sum(p.numel() for p in res.model.parameters())
            rows.append([method, target, f"{1 - after / params:.3f}", f"{100 * accuracy(res.model, data):.2f}"])
            print(rows[-1], file=sys.stderr)
    table = markdown_table(["method", "target removed", "params removed", "acc %"], rows)
    return (
        "### 3. LeNet-5, Fashion-MNIST: EigenDamage and C-OBS against C-OBD and l1-norm\n\n"
        f"Dense accuracy {100 * dense:.2f}%, {params} parameters. Channel methods: the unit ratio whose compact "
        "model removes the target fraction of parameters (measured with l1-norm).\n\n" + table + "\n"
    )


def _unit_ratio_for(model, calib, target: float, removed, round_to: int | None = None) -> float:
    """The uniform unit ratio at which ``removed(compact model)`` (a fraction of parameters or FLOPs)
    first reaches ``target``: bisection with l1-norm (under uniform allocation the compact shapes
    depend on the ratio only, not on the criterion)."""
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        res = bs.prune(model, calib, method="l1-norm", sparsity=mid, structure="channel", num_samples=len(calib[0]),
                       round_to=round_to)
        lo, hi = (mid, hi) if removed(res.model) < target else (lo, mid)
    return hi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable latencies, and no thread thrashing on a shared 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = dataset("fashion-mnist")
    parts = {"1": part_lenet300, "2": part_resnet, "3": part_lenet5}
    titles = {"1": "LeNet-300-100 neurons", "2": "SmallResNet channels to half the FLOPs", "3": "LeNet-5: EigenDamage, C-OBS, C-OBD"}
    for p in args.parts.split(","):
        t0 = time.perf_counter()
        body = parts[p](data, args.calib) + f"\n(part {p}: {time.perf_counter() - t0:.0f} s, {args.threads} torch thread(s))\n"
        record_section(
            f"structured-{p}", f"Structured pruning {p}: {titles[p]} (one-shot, no fine-tuning)",
            f"python benchmarks/structured.py --parts {p}" + (f" --calib {args.calib}" if args.calib != 1024 else ""), body,
        )

if __name__ == "__main__":
    main()
