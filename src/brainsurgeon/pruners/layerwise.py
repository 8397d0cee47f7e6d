"""Shared machinery of the layer-wise methods (OBC, SparseGPT, Wanda).

Layer-wise pruning (Dong et al. 2017 "L-OBS"; Frantar & Alistarh 2022 "OBC", 2023 "SparseGPT";
Sun et al. 2023 "Wanda") replaces the network loss by one reconstruction problem per layer,

    min_{W' with the sparsity pattern} |W X - W' X|_F^2,     H = (2/N) X X^T  (shared by every row),

where X holds the layer's inputs over the calibration set (see ``curvature.layer_inputs``).

Layers are calibrated in sequence: layer l is solved on the inputs produced by the working copy in
which layers 1..l-1 are already pruned and compensated, so each layer also corrects the error its
predecessors left (the sequential scheme of the SparseGPT reference). Where the model's chain of
blocks is found (HF transformers, ``nn.Sequential``), the statistics come block by block from
cached activations (``brainsurgeon.sequential``: O(L) block passes, layers reading one input share
one accumulation); otherwise each layer re-runs the network's prefix (O(L^2)). Both give the same
masks and weights; ``report["calibration"]["path"]`` says which ran. Measured, sparsegpt 50% on a
random Llama (4 layers, hidden 256, FFN 688, GQA 8/4 heads; 32 x 128 tokens; 1 thread, shared
2-core machine): layer-by-layer 15.3 s (statistics 13.5 s, 28 prefix passes), block-sequential
4.7 s (statistics 3.5 s, 21 block passes), identical masks and weights.

OWL allocation (``allocation="owl"``; Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL):
A Missing Secret Sauce for Pruning LLMs to High Sparsity"): on the dense model, each block's
outlier ratio D_b is the fraction of its Wanda metrics |W_ij| ||X_j|| above ``owl_m`` (5) times
their mean over the block; block sparsities S - (2 lambda n_b - mean 2 lambda n), n_b = D_b
min-max normalised, lambda = ``owl_lambda`` (0.08), so blocks with more outliers are pruned less,
within S +- lambda, mean S; per-layer counts are then made exact (``exact_counts``).

Numerics (as in SparseGPT): inputs never active on the calibration data (H_jj = 0) get H_jj = 1
and their weights are set to zero, which makes them the free first choices of every solver; the
dead weights the count does not need are given back their original values afterwards (they do not
change the layer's output on the calibration data, and a mask that keeps them must keep a value),
so the per-layer count stays exact. H is damped by ``percdamp`` times its mean diagonal (1%).

Error correction (``error_correction``: True, False, or "auto", the default of OBC and SparseGPT:
on with ``allocation="global"``, off otherwise). Solving each layer
for its *own* outputs on the pruned inputs, min |W X_p - W' X_p|^2 (the SparseGPT reference), lets
the error of the earlier layers accumulate. Instead each layer is fitted to the *dense* network's
outputs of that layer, as He, Zhang & Sun 2017 (channel pruning, section 3.3) reconstruct the
original feature maps:

    min_{W' sparse} |W X_d - W' X_p|^2 + lambda |W' - W|^2,     X_d: the layer's inputs in the dense model.

Its unconstrained optimum is  W^ = (W G + lambda W)(H + lambda I)^-1  with G = (2/N) X_d X_p^T, and
the objective equals |(W' - W^) X_p|^2 (+ lambda terms) up to a constant, so the same OBS solvers
run on W^ with the same damped H. The proximal lambda term (lambda = the damping above) makes
W^ = W exactly where X_p = X_d (the first layer) instead of shrinking weights towards zero.
Measured on LeNet-300-100 / Fashion-MNIST (dense 89.16%), SparseGPT, 1024 samples, test accuracy
with error correction on / off:

    sparsity            0.8            0.9            0.95           0.98
    global allocation   88.61 / 88.24  86.90 / 82.90  82.98 / 65.64  80.95 / 50.55
    uniform allocation  83.02 / 85.99  62.58 / 79.41  53.53 / 57.77  30.67 /  9.18

Under uniform allocation the 10-way output layer, pruned as hard as the 784-wide first layer,
cannot absorb the upstream error it is asked to undo (4096 or 16384 samples change nothing, so it
is not over-fitting), while global allocation spares it. Hence "auto".

Global allocation. Per-layer reconstruction errors live in each layer's own output units, and those
are arbitrary (a layer's output can be scaled up and the next layer's weights down without changing
the network), so they are not comparable as they are. The per-layer sparsities are chosen on the dense model from each
weight's OBS error  e_q = w_q^2 / (2 [H^-1]_qq)  (Wanda: its diagonal form w_q^2 |X_j|^2 / N)
divided by the layer's output energy  E = tr(W H W^T) / 2 = |W X|^2 / N  -- the relative error
each weight's removal causes in its layer's output -- and one global threshold with the per-layer
cap (``allocation.global_counts``) turns them into exact per-layer counts; then the layers are
pruned one by one at those counts. ``global_saliency="absolute"`` uses e_q unnormalised.

Measured on LeNet-300-100 trained on Fashion-MNIST (``train_model``, 8 epochs, seed 0; dense test
accuracy 88.13%), 1024 calibration samples, test accuracy after one-shot pruning (no fine-tuning):

    method     sparsity  global relative  global absolute  uniform
    sparsegpt  0.80      87.51%           87.49%           85.92%
    sparsegpt  0.90      84.35%           84.50%           70.79%
    sparsegpt  0.95      72.91%           74.34%           48.29%
    wanda      0.80      70.65%           70.82%           48.81%
    wanda      0.90      40.68%           40.22%           10.63%
    wanda      0.95      22.06%           21.72%           10.23%

On this network both global variants pick nearly the same allocation (first layer ~94%, last
~32% at 0.9) and both beat uniform by a wide margin; neither is consistently ahead. What decides
is invariance: the same network with layer 1 scaled by 10 and layer 2 by 1/10 (ReLU is positively
homogeneous: the function and its 88.13% are unchanged) gives, relative vs absolute,
sparsegpt 87.45% / 40.66% (0.8), 84.51% / 32.27% (0.9), 74.05% / 41.19% (0.95), and
wanda 70.65% / 33.63%, 40.68% / 23.69%, 22.06% / 14.46%: the absolute errors follow the arbitrary
scale of each layer's output and then prune the 100-unit layer to 99%, the relative ones do not
move. Hence "relative" is the default.
"""
from __future__ import annotations

import copy
import math
import time
from typing import ClassVar

import torch

from ..allocation import Structure, global_counts, layer_cap, num_pruned, uniform_count
from ..context import PruneContext
from ..distributed import split_hooks
from ..curvature import gram_kernel
from ..curvature.layer_inputs import LayerInputStats, check_supported, layer_input_stats, paired_input_stats
from ..errors import BrainsurgeonError
from ..sequential import PATH_BLOCKS, PATH_LAYERS, BlockPlan, is_chain, plan_blocks, walk_blocks
from .base import PruningMethod

GLOBAL_SALIENCIES = ("relative", "absolute")
CALIBRATION_PATHS = ("auto", "blocks", "layers")
ACTIVATION_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OWL_M, OWL_LAMBDA = 5.0, 0.08


# ----------------------------------------------------------------------------- small helpers
def row_balanced_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly ``k`` of ``scores`` (rows x cols), spread as evenly as possible over
    rows (Wanda's per-output comparison group): every row loses floor(k / rows) of its lowest, and
    the remainder goes to the rows whose next-lowest score is lowest."""
    rows, cols = scores.shape
    base, extra = divmod(k, rows)
    values, order = torch.sort(scores.double(), dim=1, stable=True)
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    prune.scatter_(1, order[:, :base], True)
    if extra:
        chosen_rows = torch.argsort(values[:, base], stable=True)[:extra]
        prune[chosen_rows, order[chosen_rows, base]] = True
    return ~prune


def nm_count(numel: int, structure: Structure) -> int:
    return numel // structure.m * (structure.m - structure.n)


def prepare_hessian(
    hessian: torch.Tensor, weight: torch.Tensor, percdamp: float, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """SparseGPT's conditioning: dead inputs (H_jj = 0) get H_jj = 1 and zero weights; then
    H += percdamp * mean(diag H) * I. Returns (H, W, dead mask, damping value).
    ``inplace`` conditions ``hessian`` itself (no second in x in copy for wide layers)."""
    h = hessian if inplace else hessian.clone()
    w = weight.clone()
    dead = torch.diagonal(h) == 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    lam = percdamp * float(torch.diagonal(h).mean())
    h.diagonal().add_(lam)
    return h, w, dead, lam


def corrected_weights(w: torch.Tensor, stats: LayerInputStats, percdamp: float) -> torch.Tensor:
    """W^ = (W G + lambda W)(H + lambda I)^-1, the unconstrained optimum of the error-correcting fit
    min |W X_d - W' X_p|^2 + lambda |W' - W|^2 (G = (2/N) X_d X_p^T, lambda = percdamp * mean diag H);
    float64, solved through the Cholesky factor of the damped H."""
    h = stats.hessian.double()
    lam = percdamp * float(torch.diagonal(h).mean())
    if lam == 0.0:  # no input is ever active: nothing to fit
        return w
    wd = w.double()
    rhs = wd @ stats.cross.double() + lam * wd
    lower = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    # W^ (H + lambda I) = rhs  <=>  (H + lambda I) W^T = rhs^T
    return torch.cholesky_solve(rhs.T, lower).T.to(w.dtype)


def cholesky_inverse(h: torch.Tensor) -> torch.Tensor:
    """H^-1 of a symmetric positive-definite H through its Cholesky factor (float64)."""
    lower, info = torch.linalg.cholesky_ex(h.double())
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"H is not positive definite (leading minor {int(info)})")
    return torch.cholesky_inverse(lower)


def obs_errors(w: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each weight alone: w_q^2 / (2 [H^-1]_qq) (Hassibi & Stork 1993)."""
    return w.double().square() / (2.0 * hinv_diag.double()[None, :])


def output_energy(w: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H W^T) / 2 = |W X|_F^2 / N: the layer output's energy, the scale of its errors."""
    w = w.double()
    return float(((w @ hessian) * w).sum()) / 2.0


# ----------------------------------------------------------------------------- OWL allocation
def owl_block_sparsities(ratios: dict[str, float], sparsity: float, lam: float) -> dict[str, float]:
    """OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): block b's sparsity is
        s_b = S - (2 lambda n_b - mean_b' 2 lambda n_b'),   n_b = (D_b - min D) / (max D - min D),
    D_b the block's outlier ratio: more outliers, lower sparsity, within [S - lambda, S + lambda],
    mean S. Equal ratios give S everywhere."""
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    spread = float(values.max() - values.min()) if len(values) else 0.0
    if spread <= 0.0:
        return dict.fromkeys(ratios, sparsity)
    shifted = (values - values.min()) / spread * (2.0 * lam)
    return {b: sparsity - float(v) for b, v in zip(ratios, shifted - shifted.mean())}


def exact_counts(fractions: dict[str, float], numels: dict[str, int], k: int, max_layer_sparsity: float) -> dict[str, int]:
    """Integer counts summing to ``k`` exactly, each within [0, cap], closest to ``fractions``: a common
    shift delta makes sum_l clip(f_l + delta) n_l = k (bisection; monotone in delta), then the
    largest remainders are rounded up."""
    caps = {n: layer_cap(numels[n], max_layer_sparsity) for n in fractions}
    if k > sum(caps.values()):
        raise BrainsurgeonError(f"{k} weights cannot be pruned under max_layer_sparsity={max_layer_sparsity}; raise the cap")

    def want(delta: float) -> dict[str, float]:
        return {n: min(max((f + delta) * numels[n], 0.0), float(caps[n])) for n, f in fractions.items()}

    lo, hi = -2.0, 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(want(mid).values()) < k else (lo, mid)
    real = want(hi)
    counts = {n: min(math.floor(v), caps[n]) for n, v in real.items()}
    short = k - sum(counts.values())
    order = sorted(real, key=lambda n: -(real[n] - math.floor(real[n])))  # stable: module order on ties
    for n in order * 2:
        if short <= 0:
            break
        if counts[n] < caps[n]:
            counts[n] += 1
            short -= 1
    if short != 0:
        raise RuntimeError(f"exact_counts left {short} weights unassigned")  # a bug
    return counts


def outlier_ratio(metrics: list[torch.Tensor], m: float) -> float:
    """Fraction of the block's |W_ij| ||X_j|| values above ``m`` times their mean over the block."""
    total = sum(float(a.sum()) for a in metrics)
    n = sum(a.numel() for a in metrics)
    threshold = m * total / max(n, 1)
    return sum(int((a > threshold).sum()) for a in metrics) / max(n, 1)


def _as_dtype(value, name: str = "activations_dtype") -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in ACTIVATION_DTYPES.values():
        return value
    if isinstance(value, str) and value in ACTIVATION_DTYPES:
        return ACTIVATION_DTYPES[value]
    raise BrainsurgeonError(f"{name} must be None or one of {sorted(ACTIVATION_DTYPES)}, got {value!r}")


def _dtype_name(value) -> str | None:
    return value if value is None or isinstance(value, str) else str(value).removeprefix("torch.")


class LayerwiseMethod(PruningMethod):
    """Base of the layer-wise methods: sequential calibration (block by block where the model's
    blocks are found, see :mod:`brainsurgeon.sequential`), exact counts, global and OWL allocation.

    Subclasses implement :meth:`solve`: ``(W (out x in), prepared stats, count, structure) ->
    (W_new, keep)`` with exactly ``count`` weights pruned.

    Common options: ``calibration_path`` ("auto": block-sequential where the blocks are found, else
    layer by layer; "blocks": refuse when no blocks are found; "layers": the O(L^2) path),
    ``activations_dtype`` (the dtype of the cached block activations: None keeps the model's;
    "bfloat16"/"float16" halve their memory), ``lockstep`` (True: each block in one pass, every
    batch pausing at each group of layers, faster but the paused forwards hold about 6-8x the cached
    activations; False: a partial pass per group; "auto": lockstep when that fits in a quarter of the
    available memory; the results are identical), ``compute_dtype`` (None: the calibration
    forwards run in the model's dtype; "bfloat16"/"float16": they run in a copy of each block in
    that dtype, while the solves update the float32 weights (``sequential.Shadow``; with bfloat16
    on a CPU with AMX the forwards are several times faster; the statistics still accumulate in
    float32/float64), ``owl_m`` (5) and ``owl_lambda`` (0.08) for ``allocation="owl"``.
    """

    supports_nm: ClassVar[bool] = True
    writes_only_targets: ClassVar[bool] = True
    #: allocations the layer-wise methods implement themselves (the engine refuses "owl" elsewhere)
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "global", "owl")
    #: whether the solver needs H (Wanda only needs the input norms)
    needs_hessian: ClassVar[bool] = True
    #: fit each layer to the dense network's outputs (see the module docstring); methods that update
    #: weights take it as an option
    error_correction: bool | str = False

    def __init__(
        self, percdamp: float | None = None, global_saliency: str = "relative", error_correction: bool | str = False,
        calibration_path: str = "auto", activations_dtype=None, owl_m: float | None = None,
        owl_lambda: float | None = None, lockstep: bool | str = "auto", compute_dtype=None,
    ) -> None:
        if not (isinstance(error_correction, bool) or error_correction == "auto"):
            raise BrainsurgeonError(f"error_correction must be True, False or 'auto', got {error_correction!r}")
        self.error_correction = error_correction
        if percdamp is not None and (
            isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (0 < percdamp and math.isfinite(percdamp))
        ):
            raise BrainsurgeonError(f"percdamp must be a positive number (fraction of mean diag H), got {percdamp!r}")
        if global_saliency not in GLOBAL_SALIENCIES:
            raise BrainsurgeonError(f"global_saliency must be one of {GLOBAL_SALIENCIES}, got {global_saliency!r}")
        self.percdamp = None if percdamp is None else float(percdamp)
        self.global_saliency = global_saliency
        self._set_calibration_options(calibration_path, activations_dtype, owl_m, owl_lambda, lockstep, compute_dtype)

    def _set_calibration_options(self, calibration_path, activations_dtype, owl_m, owl_lambda, lockstep="auto",
                                 compute_dtype=None) -> None:
        if calibration_path not in CALIBRATION_PATHS:
            raise BrainsurgeonError(f"calibration_path must be one of {CALIBRATION_PATHS}, got {calibration_path!r}")
        _as_dtype(activations_dtype)
        _as_dtype(compute_dtype, "compute_dtype")
        self.compute_dtype = _dtype_name(compute_dtype)
        for name, value, ok in (("owl_m", owl_m, lambda v: v > 0), ("owl_lambda", owl_lambda, lambda v: 0 <= v < 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)):
                raise BrainsurgeonError(f"{name} must be a number ({'> 0' if name == 'owl_m' else 'in [0, 1)'}), got {value!r}")
        self.calibration_path = calibration_path
        self.activations_dtype = activations_dtype if activations_dtype is None or isinstance(activations_dtype, str) \
            else str(activations_dtype).removeprefix("torch.")
        self.owl_m = owl_m
        self.owl_lambda = owl_lambda
        if lockstep not in (True, False, "auto"):
            raise BrainsurgeonError(f"lockstep must be True, False or 'auto', got {lockstep!r}")
        self.lockstep = lockstep

    # -------------------------------------------------------------- options and checks
    def corrects_errors(self, ctx: PruneContext) -> bool:
        """Whether this run fits layers to the dense outputs ("auto": with global allocation only)."""
        if self.error_correction == "auto":
            return ctx.options.allocation == "global" and not ctx.options.structure.is_nm
        return bool(self.error_correction)

    def _gram_products(self, ctx: PruneContext) -> str | None:
        """How the block path formed X^T X, for the report (None: no X^T X)."""
        if not self.needs_hessian:
            return None
        if self.compute_dtype == "bfloat16" and not self.corrects_errors(ctx) and ctx.device.type == "cpu":
            if gram_kernel.available():
                return "amx: bfloat16 rows, float32 tiles, float64 sum"
            return f"torch: bfloat16 rows converted to float32 ({gram_kernel.why_not()}), float64 sum"
        return "torch: the rows' dtype (float32 at least), float64 sum"

    def relative_damping(self, ctx: PruneContext) -> float:
        """``percdamp`` if given, else the run's ``damping``, else SparseGPT's 1%."""
        if self.percdamp is not None:
            if ctx.options.damping is not None and ctx.options.damping != self.percdamp:
                raise BrainsurgeonError(
                    f"damping={ctx.options.damping} and percdamp={self.percdamp} disagree; give only one"
                )
            return self.percdamp
        return ctx.options.damping if ctx.options.damping is not None else 0.01

    def validate(self, ctx: PruneContext) -> None:
        self.relative_damping(ctx)
        s = ctx.options.structure
        if ctx.options.allocation != "owl" and (self.owl_m is not None or self.owl_lambda is not None):
            raise BrainsurgeonError("owl_m and owl_lambda apply to allocation='owl' only")
        if ctx.options.allocation == "owl" and s.is_nm:
            raise BrainsurgeonError(f"allocation='owl' varies the sparsity per block; {s} fixes it: use one or the other")
        if self.calibration_path == "blocks" and self.block_plan(ctx) is None:
            raise BrainsurgeonError(
                "calibration_path='blocks': no chain of blocks holding the targets was found in this model "
                "(an HF transformer, an nn.Sequential, or nn.TransformerEncoderLayer blocks run as a plain chain); "
                "use calibration_path='auto'"
            )
        for t in ctx.targets:
            check_supported(t)
            cols = t.weight_matrix().shape[1]
            if s.is_nm and cols % s.m:
                raise BrainsurgeonError(
                    f"layer {t.name!r} has {cols} inputs per row, not a multiple of {s.m}: it cannot hold a "
                    f"{s} pattern; exclude it with layers={{'exclude': ['{t.name}']}}"
                )

    # -------------------------------------------------------------- the per-layer problem
    def solve(
        self, w: torch.Tensor, stats: LayerInputStats, count: int, structure: Structure, note=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``note(what)`` records a numerical fallback taken for this layer."""
        raise NotImplementedError  # abstract: obc, sparsegpt, wanda

    def allocation_scores(self, w: torch.Tensor, stats: LayerInputStats, percdamp: float) -> torch.Tensor:
        """Per-weight saliency comparable across layers (see the module docstring)."""
        energy = output_energy(w, stats.hessian)
        h, w_dead, _, _ = prepare_hessian(stats.hessian, w, percdamp, inplace=True)
        err = obs_errors(w_dead, torch.diagonal(cholesky_inverse(h)))
        if self.global_saliency == "absolute":
            return err
        return err / max(energy, torch.finfo(torch.float64).tiny)

    # -------------------------------------------------------------- calibration paths
    def block_plan(self, ctx: PruneContext) -> BlockPlan | None:
        """The blocks to calibrate through, or None for the layer-by-layer path."""
        plan = None if self.calibration_path == "layers" else plan_blocks(ctx.model, ctx.targets)
        if plan is not None and plan.verify_chain and not is_chain(ctx.model, plan, ctx.calib):
            plan = None  # the forward does more between the blocks than chaining them
        if plan is None and self.compute_dtype is not None:
            raise BrainsurgeonError(
                f"compute_dtype={self.compute_dtype!r} runs the forwards in a low-precision copy of each block, but this "
                "model is calibrated layer by layer (no chain of blocks found, or calibration_path='layers'); "
                "drop compute_dtype"
            )
        return plan

    def dense_statistics(self, ctx: PruneContext, plan: BlockPlan | None, visit, with_hessian: bool, what: str) -> None:
        """``visit(block, target, stats)`` for every target on the dense model (nothing is pruned)."""
        with ctx.timer("statistics"):
            rest = ctx.targets
            if plan is not None:
                hooks = None if ctx.block_hooks is None else ctx.block_hooks.dense_pass()
                walk_blocks(ctx.model, plan, ctx.calib, visit, with_hessian=with_hessian,
                            activations_dtype=_as_dtype(self.activations_dtype), track=self._tracker(ctx, what),
                            hooks=hooks, lockstep=self.lockstep, compute_dtype=_as_dtype(self.compute_dtype))
                rest = plan.tail
            for t in ctx.track(rest, what, total=len(rest)):
                visit(t.name, t, layer_input_stats(ctx.model, t, ctx.calib, with_hessian=with_hessian))

    def _tracker(self, ctx: PruneContext, what: str):
        return lambda it, description, total: ctx.track(it, f"{what}: {description}", total)

    def layer_counts(self, ctx: PruneContext, plan: BlockPlan | None = None) -> dict[str, int]:
        """How many weights each layer loses: uniform, N:M, or a global / OWL allocation on the dense model."""
        o = ctx.options
        if o.structure.is_nm:
            return {t.name: nm_count(t.weight.numel(), o.structure) for t in ctx.targets}
        if o.allocation == "owl":
            return self.owl_counts(ctx, plan)
        if o.allocation != "global":
            return {t.name: uniform_count(t.weight.numel(), o.sparsity, o.max_layer_sparsity) for t in ctx.targets}
        percdamp = self.relative_damping(ctx)
        scores = {}

        def visit(block, t, stats):
            scores[t.name] = self.allocation_scores(t.weight_matrix().detach(), stats, percdamp)

        self.dense_statistics(ctx, plan, visit, self.needs_hessian, "global allocation (dense statistics)")
        return global_counts({t.name: scores[t.name] for t in ctx.targets}, o.sparsity, o.max_layer_sparsity)

    def owl_counts(self, ctx: PruneContext, plan: BlockPlan | None) -> dict[str, int]:
        """OWL allocation: per-block outlier ratios of the Wanda metric on the dense model, block
        sparsities by :func:`owl_block_sparsities`, exact counts by :func:`exact_counts`."""
        o = ctx.options
        m = OWL_M if self.owl_m is None else float(self.owl_m)
        lam = OWL_LAMBDA if self.owl_lambda is None else float(self.owl_lambda)
        # one block's metrics at a time (all of SmolLM2's in float64 would be 850 MB): a block's
        # ratio is taken when the walk moves on to the next block
        pending: dict[str, list[torch.Tensor]] = {}
        ratios: dict[str, float] = {}
        owner: dict[str, str] = {}

        def visit(block, t, stats):
            for done in [b for b in pending if b != block]:
                ratios[done] = outlier_ratio(pending.pop(done), m)
            w = t.weight_matrix().detach().double()
            pending.setdefault(block, []).append(w.abs() * stats.sq_norms.double().sqrt()[None, :])
            owner[t.name] = block

        self.dense_statistics(ctx, plan, visit, False, "OWL allocation (dense input norms)")
        ratios.update({b: outlier_ratio(ms, m) for b, ms in pending.items()})
        block_s = owl_block_sparsities(ratios, o.sparsity, lam)
        numels = {t.name: t.weight.numel() for t in ctx.targets}
        k = num_pruned(sum(numels.values()), o.sparsity)
        counts = exact_counts({n: block_s[owner[n]] for n in numels}, numels, k, o.max_layer_sparsity)
        ctx.extra_report["owl"] = {"m": m, "lambda": lam, "outlier_ratio": ratios, "block_sparsity": block_s}
        return counts

    def prune_layer(
        self, name: str, w: torch.Tensor, stats: LayerInputStats, count: int, ctx: PruneContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition H, solve, restore the dead-input weights the count did not need, check the count."""
        dead = None
        if stats.cross is not None:
            w = corrected_weights(w, stats, self.relative_damping(ctx))
        if stats.hessian is not None:
            h, w_in, dead, lam = prepare_hessian(stats.hessian, w, self.relative_damping(ctx), inplace=True)
            ctx.numerics.damp(name, lam)
            stats = LayerInputStats(hessian=h, sq_norms=stats.sq_norms, num_rows=stats.num_rows)
        else:
            w_in = w  # Wanda: a dead input's weights score 0 and go first without any change
        if dead is not None and dead.any():
            ctx.numerics.fallback(
                name, f"{int(dead.sum())} input(s) never active on the calibration data: H_jj set to 1, "
                "their weights pruned first (kept ones keep their values)"
            )
        w_new, keep = self.solve(
            w_in, stats, count, ctx.options.structure, note=lambda what: ctx.numerics.fallback(name, what)
        )
        if dead is not None and dead.any():
            # the dead weights the solver kept: their original values (no effect on the calibration output)
            restore = keep & dead[None, :]
            w_new = torch.where(restore, w.to(w_new.dtype), w_new)
        pruned = int((~keep).sum())
        if pruned != count:
            raise RuntimeError(f"{self.name} pruned {pruned} weights of {name}, expected {count}")  # a bug
        return w_new * keep, keep

    def _prune_target(self, t, stats: LayerInputStats, count: int, ctx: PruneContext, masks: dict) -> None:
        with ctx.timer("solve"):
            w = t.weight_matrix().detach()
            w_new, keep = self.prune_layer(t.name, w, stats, count, ctx)
            with torch.no_grad():
                t.weight.copy_(w_new.reshape(t.weight.shape).to(t.weight.dtype))
        masks[t.name] = keep.reshape(t.weight.shape)

    def _run_layers(self, ctx, targets, counts, dense, masks) -> None:
        """The layer-by-layer path: each layer's statistics from a forward of the whole prefix."""
        dense_modules = dict(dense.named_modules()) if dense is not None else {}
        for t in ctx.track(targets, f"{self.name}: layers", total=len(targets)):
            with ctx.timer("statistics"):
                # the working copy: earlier layers are already pruned and compensated
                if dense is not None:
                    stats = paired_input_stats(ctx.model, t, dense, dense_modules[t.module_name], ctx.calib)
                else:
                    stats = layer_input_stats(ctx.model, t, ctx.calib, with_hessian=self.needs_hessian)
            self._prune_target(t, stats, counts[t.name], ctx, masks)

    @staticmethod
    def _hooks(ctx: PruneContext, masks: dict):
        """Out-of-core loading (``ctx.block_hooks``) and, under torch.distributed, the split solves."""
        if ctx.block_hooks is not None:
            ctx.block_hooks.attach(masks)
        return split_hooks(masks, ctx.block_hooks)

    def _run_blocks(self, ctx, plan: BlockPlan, counts, paired: bool, masks) -> None:
        """The block-sequential path (the statistics time is the walk's time less the solves')."""
        t0, solve0 = time.perf_counter(), ctx.timer.seconds.get("solve", 0.0)
        walk_blocks(
            ctx.model, plan, ctx.calib, lambda b, t, stats: self._prune_target(t, stats, counts[t.name], ctx, masks),
            with_hessian=self.needs_hessian, paired=paired, activations_dtype=_as_dtype(self.activations_dtype),
            track=self._tracker(ctx, self.name), hooks=self._hooks(ctx, masks), lockstep=self.lockstep,
            compute_dtype=_as_dtype(self.compute_dtype),
        )
        spent = time.perf_counter() - t0 - (ctx.timer.seconds.get("solve", 0.0) - solve0)
        ctx.timer.seconds["statistics"] = ctx.timer.seconds.get("statistics", 0.0) + spent

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        plan = self.block_plan(ctx)
        counts = self.layer_counts(ctx, plan)
        ctx.extra_report["target_sparsity"] = {t.name: counts[t.name] / t.weight.numel() for t in ctx.targets}
        paired = self.corrects_errors(ctx)
        ctx.extra_report["error_correction"] = paired
        # the dense network for the error-correcting fit of the layers the blocks do not cover
        dense = copy.deepcopy(ctx.model) if paired and (plan is None or plan.tail) else None
        masks: dict[str, torch.Tensor] = {}
        if plan is None:
            self._run_layers(ctx, ctx.targets, counts, dense, masks)
        else:
            plan.passes = 0  # the allocation's dense pass is counted separately
            self._run_blocks(ctx, plan, counts, paired, masks)
            self._run_layers(ctx, plan.tail, counts, dense, masks)
        self._report_path(ctx, plan)
        return masks

    def _report_path(self, ctx: PruneContext, plan: BlockPlan | None) -> None:
        cal = ctx.extra_report.get("calibration")
        cal = dict(cal) if isinstance(cal, dict) else {}
        if plan is None:
            cal.update(path=PATH_LAYERS, prefix_passes=len(ctx.targets))
        else:
            cal.update(path=PATH_BLOCKS, blocks=len(plan.blocks), block_passes=plan.passes,
                       lockstep_blocks=plan.lockstep_blocks, lockstep=plan.lockstep_reason,
                       layers_after_blocks=[t.name for t in plan.tail],
                       activations_dtype=self.activations_dtype, compute_dtype=self.compute_dtype,
                       gram=self._gram_products(ctx))
        ctx.extra_report["calibration"] = cal
