"""Sparse storage and sparse CPU inference (`make bench-sparse`).

1. Layers 4096x4096 and 1024x4096 (out x in) at sparsity 0.5 .. 0.99, batch 1 and 32: every engine
   (our numba CSR kernel, parallel and serial; MKL via sparse_dot_mkl; torch CSR and BSR) against
   dense ``F.linear`` and against torch's CSR matmul, in the same run. Medians of repeats.
2. LeNet-300-100 trained briefly on Fashion-MNIST, pruned by magnitude to 0.9 and 0.95: file sizes
   (sparse vs dense safetensors), ``to_sparse`` latency vs dense at batch 1 and 32, accuracy kept,
   ONNX (onnxruntime) latency beside PyTorch's.
Writes section "sparse" of BENCHMARKS.md; raw numbers in runs/bench/sparse.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _record import markdown_table, record_section
from common import CACHE, accuracy, calibration, dataset, dense_model

import brainsurgeon as bs
from brainsurgeon.sparse.kernels import CSR, SPARSE_ENGINES, available_engines, get_engine
from brainsurgeon.sparse.onnx import export_onnx

SHAPES = ((4096, 4096), (1024, 4096))
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
BATCHES = (1, 32)


def median_ms(fn, min_repeats: int = 15, budget_s: float = 0.5) -> float:
    """Median of at least ``min_repeats`` timed calls (more while within ``budget_s``), after warm-up."""
    fn()
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_pruned(shape, sparsity, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    return w * (torch.rand(*shape, generator=g) >= sparsity)


def layer_benchmark(engines: list[str]) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for s in SPARSITIES:
            w = random_pruned(shape, s)
            csr = CSR.from_dense(w)
            states = {e: get_engine(e).prepare(csr) for e in engines if get_engine(e).supports(csr) is None}
            for b in BATCHES:
                x = torch.randn(b, shape[1], generator=torch.Generator().manual_seed(1))
                xt = x.t().contiguous()
                ref = F.linear(x, w)
                row = {"shape": f"{shape[0]}x{shape[1]}", "sparsity": s, "batch": b,
                       "dense_ms": median_ms(lambda: F.linear(x, w)), "ms": {}, "rel_err": {}}
                for e, st in states.items():
                    y = get_engine(e).apply(st, xt).t()
                    row["rel_err"][e] = float((y - ref).abs().max() / ref.abs().max())
                    # the transposes in and out are part of the cost, as in SparseLinear
                    row["ms"][e] = median_ms(lambda: get_engine(e).apply(st, x.t().contiguous()).t())
                rows.append(row)
                best = min(row["ms"], key=row["ms"].get)
                print(f"{row['shape']} s={s} b={b}: dense {row['dense_ms']:.3f} ms, best {best} "
                      f"{row['ms'][best]:.3f} ms ({row['dense_ms'] / row['ms'][best]:.2f}x)", flush=True)
    return rows


def layer_tables(rows: list[dict], engines: list[str]) -> str:
    header = ["layer", "sparsity", "batch", "dense ms"] + [f"{e} ms (x dense / x torch_csr)" for e in engines]
    table = []
    for r in rows:
        cells = [r["shape"], r["sparsity"], r["batch"], r["dense_ms"]]
        for e in engines:
            if e not in r["ms"]:
                cells.append("n/a")
                continue
            ms = r["ms"][e]
            vs_csr = r["ms"]["torch_csr"] / ms if "torch_csr" in r["ms"] else float("nan")
            cells.append(f"{ms:.3f} ({r['dense_ms'] / ms:.2f}x / {vs_csr:.2f}x)")
        table.append(cells)
    return markdown_table(header, table)


def lenet_benchmark(epochs: int, calib_n: int) -> tuple[list[dict], dict]:
    data = dataset("fashion-mnist")
    dense, _, _ = dense_model("lenet300", data, epochs=epochs)
    calib = calibration(data, calib_n)
    out, onnx_rows = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-sparse-"))
    bs.save(dense, tmp / "dense.safetensors", format="dense")
    dense_bytes = (tmp / "dense.safetensors").stat().st_size
    dense_acc = accuracy(dense, data)
    for s in (0.9, 0.95):
        pruned = bs.prune(dense, calib, "magnitude", s).model
        rep = bs.save(pruned, tmp / f"sparse{s}.safetensors")
        loaded = bs.load(tmp / f"sparse{s}.safetensors")
        bitwise = all(torch.equal(v, pruned.state_dict()[k]) for k, v in loaded.state_dict().items())
        row = {"sparsity": s, "dense_acc": dense_acc, "pruned_acc": accuracy(pruned, data),
               "file_bytes": rep["bytes"], "dense_file_bytes": dense_bytes, "ratio": rep["bytes"] / dense_bytes,
               "bytes_per_nonzero": rep["bytes_per_nonzero"], "bitwise": bitwise, "encodings": rep["encodings"]}
        for b in BATCHES:
            x = data.x_test[:b]
            sp = bs.to_sparse(pruned, example_input=x)
            with torch.no_grad():
                t_dense = median_ms(lambda: pruned(x))
                t_sparse = median_ms(lambda: sp(x))
                err = float((sp(data.x_test[:256]) - pruned(data.x_test[:256])).abs().max())
            row[f"b{b}"] = {"dense_ms": t_dense, "sparse_ms": t_sparse, "max_abs_diff": err,
                            "engines": {k: v["engine"] for k, v in sp.sparse_report.items()},
                            "sparse_acc": accuracy(sp, data) if b == 1 else None}
        onnx_rows[s] = export_onnx(pruned, tmp / f"m{s}.onnx", data.x_test[:1])
        out.append(row)
        print(f"lenet s={s}: {row['ratio']:.3f} of dense file, b1 {row['b1']['dense_ms']:.3f} -> "
              f"{row['b1']['sparse_ms']:.3f} ms", flush=True)
    return out, onnx_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=2, help="brief training of the dense LeNet-300-100")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--no-record", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    avail = available_engines()
    engines = [e for e in SPARSE_ENGINES if avail[e] is None]
    print("engines:", engines, "unavailable:", {k: v for k, v in avail.items() if v}, flush=True)
    rows = layer_benchmark(engines)
    lenet, onnx_rows = lenet_benchmark(args.epochs, args.calib)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "sparse.json").write_text(json.dumps({"layers": rows, "lenet": lenet, "onnx": onnx_rows}, indent=2))

    body = [
        "Times are medians of repeated calls (at least 15, more within 0.5 s) on a CPU shared with other work "
        "while this ran; ratios compare engines measured in the same run. `bitmask` is our C kernel "
        "(a uint16 of presence bits per 16 columns, AVX-512 expand-load; torch's threads), `numba_csr_serial` our "
        "numba CSR kernel (uint16 column indices) on one thread; `_serial` engines run on one thread. "
        f"torch uses {torch.get_num_threads()} threads."
        + (f" Unavailable here: {', '.join(f'{k} ({v})' for k, v in avail.items() if v)}." if any(avail.values()) else ""),
        "", "### Layers (y = W x, W out x in)", "", layer_tables(rows, engines), "",
        "### LeNet-300-100, Fashion-MNIST, magnitude-pruned", "",
        markdown_table(
            ["sparsity", "accuracy dense / pruned", "file (sparse)", "of dense file", "bytes per non-zero",
             "bitwise reload", "b1 dense ms", "b1 to_sparse ms", "b32 dense ms", "b32 to_sparse ms", "engines chosen (b1)"],
            [[r["sparsity"], f"{r['dense_acc']:.4f} / {r['pruned_acc']:.4f}", r["file_bytes"], f"{100 * r['ratio']:.1f}%",
              r["bytes_per_nonzero"], r["bitwise"], r["b1"]["dense_ms"], r["b1"]["sparse_ms"], r["b32"]["dense_ms"],
              r["b32"]["sparse_ms"], ", ".join(f"{k}: {v}" for k, v in r["b1"]["engines"].items())] for r in lenet]),
        "", "### ONNX (onnxruntime, CPU) beside PyTorch, batch 1", "",
        markdown_table(["sparsity", "ONNX bytes", "max abs diff", "PyTorch ms", "onnxruntime ms"],
                       [[s, r["bytes"], f"{r['max_abs_diff']:.1e}", r["torch_ms"], r["onnxruntime_ms"]]
                        for s, r in onnx_rows.items()]),
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_record:
        record_section("sparse", "Sparse storage and inference", "make bench-sparse", text)


if __name__ == "__main__":
    main()
