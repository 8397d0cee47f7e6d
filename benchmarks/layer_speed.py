"""Speed of the layer-wise solvers on one 4096 x 4096 Linear layer, 8192 calibration rows, 50% sparsity.

* ``sparsegpt``: statistics (building H) and solve timed separately with the library's own
  functions, and the whole ``bs.prune`` call;
* the peer: a re-implementation written for this benchmark of SparseGPT as its paper's Algorithm 1
  and public reference code structure it (float32 H accumulated batch by batch with running
  rescaling inside a forward hook on the layer; then Cholesky, cholesky_inverse, upper Cholesky
  and the blocked loop with a threshold mask per block, all in float32), timed in the same run;
* ``obc``: O(rows * cols^3), so it is timed on a few rows and a few greedy steps and extrapolated
  (every step costs the same: one cols x cols rank-1 downdate per row), clearly labelled;
* peak resident memory growth of the whole ``bs.prune`` call over the model + calibration tensors,
  measured in a fresh subprocess (``ru_maxrss``).

Bars: sparsegpt solve < 1.5 s; whole call faster than the peer's statistics + solve; memory
growth <= 1 GB. Medians of ``--repeats`` runs. Writes the ``layer-speed`` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import markdown_table, record_section  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.allocation import Structure, num_pruned  # noqa: E402
from brainsurgeon.curvature.layer_inputs import layer_input_stats  # noqa: E402
from brainsurgeon.data import Calibration  # noqa: E402
from brainsurgeon.pruners.layerwise import cholesky_inverse, prepare_hessian  # noqa: E402
from brainsurgeon.pruners.obc import greedy_rows  # noqa: E402
from brainsurgeon.pruners.sparsegpt import sparsegpt_prune  # noqa: E402
from brainsurgeon.targets import Target  # noqa: E402

DIM, ROWS, SPARSITY, BATCH = 4096, 8192, 0.5, 128
PEER_BATCH = 2048  # the reference hooks one 2048-token sequence per call: its favourable granularity
GB = 1e9


def make_problem(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The layer and correlated calibration inputs (a low-rank common part plus noise), built in
    place chunk by chunk so that no temporary exceeds the final tensors (keeps the memory baseline honest)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(DIM, DIM)
    x = torch.randn(ROWS, DIM, generator=g)
    mix = torch.randn(64, DIM, generator=g) * 0.5
    for r in range(0, ROWS, 1024):
        x[r : r + 1024].addmm_(torch.randn(min(1024, ROWS - r), 64, generator=g), mix)
    y = torch.randint(0, DIM, (ROWS,), generator=g)
    return layer, x, y


# ----------------------------------------------------------------------------- the peer
class PeerSparseGPT:
    """SparseGPT as the reference structures it (written here from the paper's Algorithm 1)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.cols = layer.weight.shape[1]
        self.H = torch.zeros(self.cols, self.cols)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, self.cols).t().float()
        tmp = inp.shape[1]
        self.H *= self.nsamples / (self.nsamples + tmp)  # running mean, rescaled every batch
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())

    def collect(self, x: torch.Tensor) -> None:
        handle = self.layer.register_forward_hook(lambda m, i, o: self.add_batch(i[0].data))
        with torch.no_grad():
            for r in range(0, len(x), PEER_BATCH):
                self.layer(x[r : r + PEER_BATCH])
        handle.remove()

    def fasterprune(self, sparsity: float, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
        W = self.layer.weight.data.clone().float()
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.cols)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, self.cols, blocksize):
            i2 = min(i1 + blocksize, self.cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        return W


# ----------------------------------------------------------------------------- timing helpers
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def relative_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    """|W X - W' X|^2 / |W X|^2 on (a slice of) the calibration rows."""
    xs = x[:2048].double()
    ref = xs @ w.double().T
    return float((xs @ w_new.double().T - ref).square().sum() / ref.square().sum())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child() -> None:
    """In a fresh process: resident-memory growth of one whole bs.prune call.

    The peak is the kernel's high-water mark VmHWM, reset just before the call by writing 5 to
    /proc/self/clear_refs (ru_maxrss cannot be used: it carries the parent's peak across exec and
    the peak of building the data)."""
    import gc

    layer, x, y = make_problem()
    gc.collect()
    rss_before = _status_kb("VmRSS") * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    hwm_reset = _status_kb("VmHWM") * 1024
    bs.prune(layer, (x, y), "sparsegpt", SPARSITY, num_samples=ROWS, batch_size=BATCH)
    peak_after = _status_kb("VmHWM") * 1024
    print(json.dumps({"rss_before": rss_before, "peak_before": hwm_reset, "peak_after": peak_after, "reset": reset}))


def measure_memory() -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child"], check=True, capture_output=True, text=True
    ).stdout
    m = json.loads(out.strip().splitlines()[-1])
    if not m["reset"] or m["peak_before"] > m["rss_before"] * 1.05:
        raise RuntimeError(f"could not reset the memory high-water mark: {m}")
    m["growth"] = m["peak_after"] - m["rss_before"]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--obc-rows", type=int, default=2)
    ap.add_argument("--obc-steps", type=int, default=32)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = ap.parse_args()
    if args.memory_child:
        memory_child()
        return

    load_start = os.getloadavg()[0]
    layer, x, y = make_problem()
    w = layer.weight.detach()
    count = num_pruned(w.numel(), SPARSITY)
    unstructured = Structure.parse("unstructured")
    calib = Calibration.from_data((x, y), ROWS, BATCH)
    target = Target("layer", layer)
    t: dict[str, list[float]] = {k: [] for k in ("stats", "solve", "call", "peer_stats", "peer_accum", "peer_solve")}
    errs = {}
    for rep in range(args.repeats):
        dt, stats = timed(lambda: layer_input_stats(layer, target, calib))
        t["stats"].append(dt)

        def solve(stats=stats):
            h, w_in, _, _ = prepare_hessian(stats.hessian, w, 0.01, inplace=True)
            return sparsegpt_prune(w_in, h, count, unstructured)

        dt, (w_sg, keep) = timed(solve)
        t["solve"].append(dt)
        del stats
        dt, res = timed(lambda: bs.prune(layer, (x, y), "sparsegpt", SPARSITY, num_samples=ROWS, batch_size=BATCH))
        t["call"].append(dt)
        assert res.report["overall"]["zeros"] == count, res.report["overall"]
        del res

        peer = PeerSparseGPT(layer)
        dt, _ = timed(lambda peer=peer: peer.collect(x))
        t["peer_stats"].append(dt)
        dt, w_peer = timed(lambda peer=peer: peer.fasterprune(SPARSITY))
        t["peer_solve"].append(dt)
        accum_only = PeerSparseGPT(layer)  # the accumulation alone, without the layer's forward
        dt, _ = timed(lambda acc=accum_only: [acc.add_batch(x[r : r + PEER_BATCH]) for r in range(0, ROWS, PEER_BATCH)])
        t["peer_accum"].append(dt)
        if rep == 0:
            errs = {
                "ours": relative_error(w, w_sg, x),
                "peer": relative_error(w, w_peer, x),
                "ours_zeros": int((w_sg == 0).sum()),
                "peer_zeros": int((w_peer == 0).sum()),
            }
        del peer, accum_only, w_peer, w_sg
        print(f"repeat {rep}: " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in t.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in t.items()}

    # OBC: a few rows x a few greedy steps, extrapolated to rows x cols steps x 2 passes (trace + replay)
    h = layer_input_stats(layer, target, calib).hessian
    h, w_in, _, _ = prepare_hessian(h, w, 0.01, inplace=True)
    dt_inv, hinv = timed(lambda: cholesky_inverse(h))
    steps = torch.full((args.obc_rows,), args.obc_steps)
    obc_t = []
    for _ in range(args.repeats):
        dt, _ = timed(lambda: greedy_rows(w_in[: args.obc_rows].double(), hinv, steps, unstructured))
        obc_t.append(dt)
    per_row_step = statistics.median(obc_t) / (args.obc_rows * args.obc_steps)
    obc_total = dt_inv + per_row_step * DIM * DIM * 2

    mem = measure_memory()
    peer_total = med["peer_stats"] + med["peer_solve"]
    rows = [
        ["sparsegpt statistics (H, float32 chunks -> float64)", med["stats"], ""],
        ["sparsegpt solve (condition + Cholesky + blocked loop)", med["solve"], "bar < 1.5 s"],
        ["sparsegpt whole bs.prune call", med["call"], f"{med['call'] / peer_total:.2f} x peer total (bar < 1)"],
        ["peer statistics (layer forward + hook, 2048-row batches)", med["peer_stats"], ""],
        ["peer statistics, accumulation only (no layer forward)", med["peer_accum"], ""],
        ["peer solve", med["peer_solve"], f"ours / peer = {med['solve'] / med['peer_solve']:.2f}"],
        ["peer statistics + solve", peer_total, ""],
        [f"obc (EXTRAPOLATED from {args.obc_rows} rows x {args.obc_steps} steps)", obc_total,
         f"{per_row_step * 1e3:.2f} ms per row-step x {DIM} rows x {DIM} steps x 2 passes + inverse {dt_inv:.2f} s"],
    ]
    body = (
        f"One `nn.Linear({DIM}, {DIM})`, {ROWS} calibration rows (Gaussian plus a rank-64 common part), "
        f"sparsity {SPARSITY}, unstructured. Seconds, median of {args.repeats} repeats "
        f"(all repeats: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in t.items()})}).\n\n"
        + markdown_table(["what", "seconds", "note"], rows)
        + f"\n\nStatistics alone: ours {med['stats']:.2f} s vs the peer's {med['peer_stats']:.2f} s "
        f"({med['peer_accum']:.2f} s without the layer forward). Whole call vs peer statistics + solve: "
        f"{med['call']:.2f} s vs {peer_total:.2f} s (ratio {med['call'] / peer_total:.2f}); "
        f"peer statistics without its layer forward + solve: {med['peer_accum'] + med['peer_solve']:.2f} s "
        f"(ratio {med['call'] / (med['peer_accum'] + med['peer_solve']):.2f}). Each repeat runs ours and the "
        f"peer back to back, so per-repeat ratios are the fairest on a busy machine: whole call / peer total = "
        f"{', '.join(f'{c / (ps + pv):.2f}' for c, ps, pv in zip(t['call'], t['peer_stats'], t['peer_solve']))}; "
        f"our solve / peer solve = {', '.join(f'{a / b:.2f}' for a, b in zip(t['solve'], t['peer_solve']))}.\n\n"
        f"Same problem, same result quality: relative reconstruction error |WX - W'X|^2 / |WX|^2 on 2048 "
        f"calibration rows: ours {errs['ours']:.4f}, peer {errs['peer']:.4f}; zeros: ours {errs['ours_zeros']} "
        f"(exactly {count}), peer {errs['peer_zeros']}.\n\n"
        f"Memory (fresh subprocess, whole `bs.prune` call, kernel high-water mark VmHWM reset before the "
        f"call): resident before the call {mem['rss_before'] / GB:.2f} GB, peak during the call "
        f"{mem['peak_after'] / GB:.2f} GB: growth **{mem['growth'] / GB:.2f} GB** (bar <= 1 GB; the working copy of "
        f"the layer is {w.numel() * 4 / GB:.3f} GB, H in float64 {DIM * DIM * 8 / GB:.3f} GB).\n\n"
        f"Machine load (1-minute load average on the 2 cores): {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; this machine is shared, so compare the per-repeat ratios."
    )
    print(body)
    if not args.no_record:
        record_section("layer-speed", "Layer-wise solver speed (SparseGPT, OBC)", "make bench-layer-speed", body)


if __name__ == "__main__":
    main()
