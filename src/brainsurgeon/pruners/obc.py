"""OBC, the Optimal Brain Compressor (Frantar & Alistarh 2022, "Optimal Brain Compression: A
Framework for Accurate Post-Training Quantization and Pruning"), in its pruning form (ExactOBS)."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..allocation import Structure
from ..curvature.layer_inputs import LayerInputStats
from ..errors import BrainsurgeonError
from ..registry import register
from .layerwise import LayerwiseMethod, cholesky_inverse

#: memory for one chunk of per-row inverses (rows x in x in, float64): rows are batched up to this
CHUNK_BYTES = 256 * 2**20
#: seconds per rows * cols^3 of one layer's solve (greedy traces + replay, each d rank-1 downdates of
#: d x d inverses per row). Measured with torch on 1 CPU thread on the shared 2-core machine:
#: 64x128 0.72 s, 64x256 4.7 s, 32x384 7.6 s -> 5.3e-9, 4.4e-9, 4.2e-9 (the largest kept, rounded up).
SECONDS_PER_ROW_COL3 = 4.5e-9
#: an hour: LeNet-300-100 on 784 pixels is estimated at about 11 minutes and stays allowed; one
#: 576 x 1536 down projection of SmolLM2-135M alone is estimated at 2.6 hours (30 of them per model)
DEFAULT_TIME_BUDGET_S = 3600.0


def time_estimate_s(targets) -> float:
    """Estimated solve time of OBC over ``targets``: SECONDS_PER_ROW_COL3 * sum of rows * cols^3."""
    total = 0.0
    for t in targets:
        rows, cols = t.weight_matrix().shape
        total += float(rows) * float(cols) ** 3
    return SECONDS_PER_ROW_COL3 * total


def obs_step(w: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor, active: torch.Tensor | None = None):
    """One exact OBS step on a batch of rows, in place: remove weight q[b] of row b.

        loss_b = w_q^2 / (2 [H^-1]_qq),   w -= (w_q / [H^-1]_qq) H^-1[:, q],
        H^-1 -= H^-1[:, q] H^-1[q, :] / [H^-1]_qq   (one Gauss elimination step: the inverse of H
        with row and column q removed, padded with zeros at q).

    ``w``: (B, d); ``hinv``: (B, d, d); ``q``: (B,) indices; rows with ``active`` False are left alone.
    Returns the losses (B,).
    """
    b = torch.arange(w.shape[0], device=w.device)
    col = hinv[b, :, q]  # (B, d) = H^-1[:, q] (symmetric: also the row)
    dq = col[b, q]
    wq = w[b, q]
    loss = wq.square() / (2.0 * dq)
    coef = wq / dq
    if active is not None:
        coef = torch.where(active, coef, 0.0)
        col = col * active[:, None]
    w.sub_(coef[:, None] * col)
    w[b, q] = torch.where(active, 0.0, w[b, q]) if active is not None else 0.0
    hinv.baddbmm_(col.unsqueeze(2), (col / dq[:, None]).unsqueeze(1), alpha=-1.0)
    return loss


def _candidates(pruned: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Weights that may still be removed: not yet pruned and, for N:M, in a group not yet full."""
    allowed = ~pruned
    if structure.is_nm:
        rows, d = pruned.shape
        full = pruned.view(rows, d // structure.m, structure.m).sum(-1) >= structure.m - structure.n
        allowed &= ~full.repeat_interleave(structure.m, dim=1)
    return allowed


def greedy_rows(
    w: torch.Tensor,
    hinv: torch.Tensor,
    steps: torch.Tensor,
    structure: Structure,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy OBS on a chunk of rows: row b removes ``steps[b]`` weights, each time the one with the
    lowest w_q^2 / [H^-1]_qq (or the given ``order``). Returns (W, pruned, losses, order)."""
    w = w.clone()
    hinv = hinv.expand(w.shape[0], -1, -1).clone()
    rows, d = w.shape
    pruned = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    n_steps = int(steps.max()) if rows else 0
    losses = torch.zeros(rows, n_steps, dtype=w.dtype, device=w.device)
    taken = torch.zeros(rows, n_steps, dtype=torch.long, device=w.device)
    b = torch.arange(rows, device=w.device)
    for s in range(n_steps):
        active = steps > s
        if order is not None:
            q = order[:, s]
        else:
            allowed = _candidates(pruned, structure)
            score = torch.where(allowed, w.square() / torch.diagonal(hinv, dim1=1, dim2=2), torch.inf)
            q = torch.argmin(score, dim=1)
        losses[:, s] = obs_step(w, hinv, q, active)
        taken[:, s] = q
        pruned[b, q] |= active
    return w, pruned, losses, taken


def row_counts(losses: torch.Tensor, count: int) -> torch.Tensor:
    """How many weights each row loses, ``count`` in all: the ``count`` lowest step losses, each row's
    losses made non-decreasing (running max) so that every row's choice is a prefix of its greedy
    order (OBC's selection from the per-row pruning traces)."""
    mono = torch.cummax(losses.double(), dim=1).values
    chosen = torch.argsort(mono.reshape(-1), stable=True)[:count]
    return torch.bincount(chosen // losses.shape[1], minlength=losses.shape[0])


def obc_prune(
    w: torch.Tensor, hessian: torch.Tensor, count: int, structure: Structure, chunk_rows: int | None = None,
    track=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ExactOBS pruning of ``w`` (out x in) on the (damped) H; exactly ``count`` weights go.

    Rows are independent problems sharing H^-1; they are processed in parallel chunks (one
    (rows, d, d) batch of inverses). Unstructured: every row is first pruned greedily to the end,
    recording the loss of each step; the per-row counts are chosen from those traces
    (:func:`row_counts`) and the rows are replayed to their counts. N:M: every row removes M-N per
    group of M greedily (a full group is no longer a candidate).

    ``track(iterable, description, total)`` reports progress per chunk of rows (a wide layer takes
    minutes: a bar per layer alone would sit at 0% without an ETA).
    """
    rows, d = w.shape
    if count == 0 and not structure.is_nm:
        return w.clone(), torch.ones_like(w, dtype=torch.bool)
    dtype = torch.float64  # hundreds of rank-1 downdates: float32 would drift
    hinv = cholesky_inverse(hessian).to(dtype)
    chunk = chunk_rows or max(1, min(rows, CHUNK_BYTES // (8 * d * d)))
    w64 = w.to(dtype)
    out = torch.empty_like(w64)
    pruned = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    starts = range(0, rows, chunk)
    if track is None or len(starts) < 2:  # one chunk: nothing to show between its start and end
        track = lambda it, description, total: it  # noqa: E731
    if structure.is_nm:
        per_row = d // structure.m * (structure.m - structure.n)
        for r0 in track(starts, f"obc: rows {rows}x{d}, chunks of {chunk}", len(starts)):
            r1 = min(r0 + chunk, rows)
            steps = torch.full((r1 - r0,), per_row, device=w.device)
            out[r0:r1], pruned[r0:r1], _, _ = greedy_rows(w64[r0:r1], hinv, steps, structure)
    else:
        full = torch.full((rows,), d, device=w.device)
        traces, orders = [], []
        for r0 in track(starts, f"obc: row traces {rows}x{d}, chunks of {chunk}", len(starts)):
            r1 = min(r0 + chunk, rows)
            _, _, loss, order = greedy_rows(w64[r0:r1], hinv, full[r0:r1], structure)
            traces.append(loss)
            orders.append(order)
        counts = row_counts(torch.cat(traces), count)
        order = torch.cat(orders)
        for r0 in track(starts, f"obc: replay {rows}x{d} to the chosen counts", len(starts)):
            r1 = min(r0 + chunk, rows)
            out[r0:r1], pruned[r0:r1], _, _ = greedy_rows(
                w64[r0:r1], hinv, counts[r0:r1], structure, order=order[r0:r1]
            )
    return out.to(w.dtype if w.dtype == torch.float64 else torch.float32), ~pruned


@register("obc")
class OBC(LayerwiseMethod):
    """OBC / ExactOBS (Frantar & Alistarh 2022), layer by layer on H = (2/N) X X^T (as L-OBS, Dong
    et al. 2017, but exact per row instead of one-shot).

    Each output row is its own quadratic problem with Hessian H. Greedily, the row removes the
    weight with the lowest OBS error and compensates the rest exactly:
        q = argmin_q w_q^2 / [H^-1]_qq,   w -= (w_q / [H^-1]_qq) H^-1[:, q],
        H^-1 <- H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq   (H^-1 of H without row/column q).
    Rows run in parallel chunks (a batch of per-row inverses). The per-row counts come from the
    rows' full pruning traces (exactly the layer's count in all); N:M removes M-N per group of M.
    Cost O(out * in^3): exact but slow for wide layers (SparseGPT is its fast approximation).

    Options: ``percdamp`` (default: the run's ``damping``, else 0.01), ``chunk_rows`` (rows solved
    at once; default: as many as fit in 256 MiB), ``global_saliency`` (see layerwise).
    ``error_correction`` (default "auto": on with global allocation; True: each layer is fitted
    to the dense network's outputs; see layerwise). ``time_budget_s`` (3600): OBC states its
    estimated solve time (:func:`time_estimate_s`, from rows x cols^3 per layer) and refuses, before
    any work, when it exceeds the budget (SparseGPT and Wanda scale to LLM sizes).
    """

    summary = "OBC (Frantar & Alistarh 2022): exact greedy OBS per output row on the layer's X X^T."
    supports_nm: ClassVar[bool] = True

    def __init__(
        self, percdamp: float | None = None, chunk_rows: int | None = None, global_saliency: str = "relative",
        error_correction: bool | str = "auto",
        calibration_path: str = "auto", activations_dtype=None, owl_m: float | None = None,
        owl_lambda: float | None = None, lockstep: bool | str = "auto", time_budget_s: float = DEFAULT_TIME_BUDGET_S,
        compute_dtype=None,
    ) -> None:
        super().__init__(
            percdamp=percdamp, global_saliency=global_saliency, error_correction=error_correction, calibration_path=calibration_path,
            activations_dtype=activations_dtype, owl_m=owl_m, owl_lambda=owl_lambda, lockstep=lockstep,
            compute_dtype=compute_dtype,
        )
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise BrainsurgeonError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not time_budget_s > 0:
            raise BrainsurgeonError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
        self.chunk_rows = chunk_rows
        self.time_budget_s = float(time_budget_s)

    def validate(self, ctx) -> None:
        super().validate(ctx)
        estimate = time_estimate_s(ctx.targets)
        ctx.extra_report["obc_time_estimate_s"] = estimate
        if estimate > self.time_budget_s:
            widest = max(ctx.targets, key=lambda t: t.weight_matrix().shape[1])
            rows, cols = widest.weight_matrix().shape
            raise BrainsurgeonError(
                f"obc would take about {estimate:.3g} s here ({SECONDS_PER_ROW_COL3:g} s x rows x cols^3 summed over "
                f"{len(ctx.targets)} layers; widest {widest.name}: {rows}x{cols}), over time_budget_s={self.time_budget_s:g}; "
                "use sparsegpt or wanda, which scale to these sizes, or raise time_budget_s"
            )

    def run(self, ctx):
        self._track = ctx.track  # progress per chunk of rows inside each layer's solve
        try:
            return super().run(ctx)
        finally:
            self._track = None

    def solve(self, w: torch.Tensor, stats: LayerInputStats, count: int, structure: Structure, note=None):
        return obc_prune(w, stats.hessian, count, structure, self.chunk_rows, getattr(self, "_track", None))
