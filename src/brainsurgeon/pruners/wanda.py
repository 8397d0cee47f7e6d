"""Wanda (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large
Language Models"): pruning by weights and activations."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..allocation import Structure, nm_mask
from ..curvature.layer_inputs import LayerInputStats
from ..errors import BrainsurgeonError
from ..registry import register
from .layerwise import GLOBAL_SALIENCIES, LayerwiseMethod, row_balanced_mask


def wanda_scores(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * |X_j|_2, the norm of input j over all calibration rows."""
    return w.abs() * sq_norms.to(w.dtype).sqrt()[None, :]


def wanda_mask(w: torch.Tensor, sq_norms: torch.Tensor, count: int, structure: Structure) -> torch.Tensor:
    """Keep-mask: per output row, the lowest scores go (N:M: the M-N lowest of each group)."""
    s = wanda_scores(w, sq_norms)
    if structure.is_nm:
        return nm_mask(s, structure.n, structure.m)
    return row_balanced_mask(s, count)


@register("wanda")
class Wanda(LayerwiseMethod):
    """Wanda (Sun et al. 2023): S_ij = |W_ij| * |X_j|_2, compared within each output row, no update.

    |X_j|_2 is the norm of the layer's input feature j over all calibration rows (conv: over
    every unfolded patch position). Each output row loses the same number of weights (the paper's
    per-output comparison group; when the layer's count is not a multiple of the rows, the remainder
    goes to the rows whose next-lowest score is lowest, so the count is exact). N:M: the M-N
    lowest of every group of M inputs in a row. Layers are calibrated in sequence on the pruned
    earlier layers, as in the paper's code.

    Global allocation: S_ij^2 / N = W_ij^2 |X_j|^2 / N is the diagonal (OBD-like) form of the
    weight's reconstruction error; divided by its layer's sum (the diagonal estimate of the output
    energy), it is a relative error comparable across layers (``global_saliency="relative"``,
    the default; see the layerwise module for the measurement).
    """

    summary = "Wanda (Sun et al. 2023): |W_ij| * |X_j|_2 per output row, no weight update."
    supports_nm: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False

    def __init__(
        self, global_saliency: str = "relative", calibration_path: str = "auto", activations_dtype=None,
        owl_m: float | None = None, owl_lambda: float | None = None, lockstep: bool | str = "auto",
        compute_dtype=None,
    ) -> None:
        if global_saliency not in GLOBAL_SALIENCIES:
            raise BrainsurgeonError(f"global_saliency must be one of {GLOBAL_SALIENCIES}, got {global_saliency!r}")
        self.global_saliency = global_saliency
        self.percdamp = None  # no inverse: damping does not apply
        self.error_correction = False  # no weight update: nothing to fit
        self._set_calibration_options(calibration_path, activations_dtype, owl_m, owl_lambda, lockstep, compute_dtype)

    def relative_damping(self, ctx) -> float:
        return 0.0

    def validate(self, ctx) -> None:
        if ctx.options.damping is not None:
            raise BrainsurgeonError("wanda inverts nothing, so damping does not apply to it; leave damping out")
        super().validate(ctx)

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("percdamp", "error_correction")}

    def allocation_scores(self, w: torch.Tensor, stats: LayerInputStats, percdamp: float) -> torch.Tensor:
        err = wanda_scores(w.double(), stats.sq_norms).square() / max(stats.num_rows, 1)
        if self.global_saliency == "absolute":
            return err
        return err / max(float(err.sum()), torch.finfo(torch.float64).tiny)

    def solve(self, w: torch.Tensor, stats: LayerInputStats, count: int, structure: Structure, note=None):
        keep = wanda_mask(w, stats.sq_norms, count, structure)
        return w, keep
