"""Layer-wise curvature: H = (2/N) X X^T of one layer's inputs over the calibration set.

For the layer-wise reconstruction problem min_W' |W X - W' X|_F^2 (L-OBS, OBC, SparseGPT) the
Hessian of every output row is the same ``in x in`` matrix H = 2 X X^T; we normalise by the number
of input rows N so that H does not grow with the calibration set (the argmin is unchanged).

X holds one column per *input row* of the layer:

* ``nn.Linear``: every row of the input (all leading dimensions flattened: a batch of sequences
  contributes batch * length rows);
* ``nn.Conv2d`` (groups=1): every unfolded patch (C_in * kh * kw values, the layer's own kernel,
  stride, padding, padding mode and dilation), so that the convolution is W (out x C_in*kh*kw) @ X.

Wanda only needs the squared norms |X_j|_2^2 (= the diagonal of X X^T), which are collected
without forming X X^T.

Precision and speed: batches are gathered into chunks of about 16M values (e.g. 4096 rows of
4096 inputs); each chunk's X^T X is one matmul in the activations' dtype (float32 for a float32
model: the fast BLAS path), added into a float64 accumulator. Sums over one chunk's few thousand
rows are accurate in float32; the running sum over many chunks is where float32 would lose digits,
and that is kept in float64. A float64 model's activations stay float64 throughout.

The inputs are captured with a forward *pre*-hook on the layer, which then stops the forward pass
(the rest of the network is not needed). A module called several times in one forward pass
(weight sharing) is therefore seen at its first call only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Calibration
from ..errors import BrainsurgeonError
from ..targets import Target


class _StopForward(BaseException):
    """Raised by the capture hook: the layer's input is all we need from this forward pass.
    (A BaseException, so that a model's own ``except Exception`` does not swallow it.)"""


@dataclass
class LayerInputStats:
    """Statistics of one layer's inputs: H = (2/N) X X^T (or None) and the squared input norms."""

    hessian: torch.Tensor | None  # (in, in) float64, H = (2/N) X X^T
    sq_norms: torch.Tensor  # (in,) float64, |X_j|_2^2 summed over all N input rows (Wanda)
    num_rows: int  # N
    #: (in, in) float64, G = (2/N) X_ref X^T: the same layer's inputs in a reference (dense) model
    #: against this model's, for the error-correcting target min |W X_ref - W' X|^2
    cross: torch.Tensor | None = None


def check_supported(target: Target) -> None:
    """Refuse layers whose input rows are not one X column per output (grouped convolutions)."""
    m = target.module
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise BrainsurgeonError(
            f"layer {target.name!r} is a grouped Conv2d (groups={m.groups}); layer-wise methods need "
            f"groups=1 (one input matrix shared by all filters). Exclude it with layers={{'exclude': ['{target.name}']}}"
        )


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of X^T: (N, in) for Linear, (B * L, C_in*kh*kw) patches for Conv2d."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input (C, H, W)
            x = x.unsqueeze(0)
        # Pad exactly as the layer does (string padding and non-zero padding modes included),
        # then unfold with no padding: each column of the unfold is one patch the filters see.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise BrainsurgeonError(f"layer-wise statistics support nn.Linear and nn.Conv2d, not {type(module).__name__}")


class _Accumulator:
    """Running float64 sums of X X^T (optional) and of the squared norms.

    Small batches are buffered until about ``FLUSH_ELEMENTS`` values are pending and then go
    through one matmul: fewer, larger products are faster, and each float64 addition of the
    in x in product is paid once per flush rather than once per batch."""

    FLUSH_ELEMENTS = 2**24  # 64 MiB of float32 rows

    def __init__(self, dim: int, device: torch.device, with_hessian: bool, with_cross: bool = False) -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device) if with_hessian else None
        self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=device) if with_cross else None
        self.sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.rows = 0
        self._pending: list[torch.Tensor] = []
        self._pending_ref: list[torch.Tensor] = []
        self._pending_elems = 0

    def add(self, rows: torch.Tensor, ref_rows: torch.Tensor | None = None) -> None:
        rows = rows.detach()
        if not rows.is_floating_point():
            rows = rows.float()
        self.rows += rows.shape[0]
        if self.xtx is None:
            self.sq += rows.to(torch.float64).square().sum(0)
        else:  # the squared norms are diag(X X^T): read them off at the end
            self._pending.append(rows)
            if self.cross is not None:
                self._pending_ref.append(ref_rows.detach().to(rows.dtype))
            self._pending_elems += rows.numel()
            if self._pending_elems >= self.FLUSH_ELEMENTS:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_elems = [], 0
        # one fast matmul in the activations' dtype, summed in float64
        self.xtx += (x.T @ x).to(torch.float64)
        if self.cross is not None:
            ref = self._pending_ref[0] if len(self._pending_ref) == 1 else torch.cat(self._pending_ref)
            self._pending_ref = []
            self.cross += (ref.T @ x).to(torch.float64)

    def result(self) -> LayerInputStats:
        n = max(self.rows, 1)
        hessian = None
        if self.xtx is not None:
            self._flush()
            self.sq = torch.diagonal(self.xtx).clone()
            hessian = self.xtx.mul_(2.0 / n)
        cross = None if self.cross is None else self.cross.mul_(2.0 / n)
        return LayerInputStats(hessian=hessian, sq_norms=self.sq, num_rows=self.rows, cross=cross)


def layer_input_stats(
    model: nn.Module, target: Target, calib: Calibration, with_hessian: bool = True, track=None
) -> LayerInputStats:
    """Run the calibration batches through ``model`` (as it is now: earlier layers may already be
    pruned) and collect the statistics of ``target``'s inputs, stopping each forward at the layer."""
    check_supported(target)
    module = target.module
    dim = target.weight_matrix().shape[1]
    acc = _Accumulator(dim, target.weight.device, with_hessian)
    calls = {"n": 0}

    def hook(mod, args):
        calls["n"] += 1
        acc.add(input_rows(mod, args[0]))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    batches = calib.batches if track is None else track(calib.batches, f"inputs of {target.name}", total=len(calib.batches))
    try:
        with torch.no_grad():
            for x, _ in batches:
                before = calls["n"]
                try:
                    model(x)
                except _StopForward:
                    pass
                if calls["n"] == before:
                    raise BrainsurgeonError(
                        f"layer {target.name!r} is not called in the model's forward pass, so it has no "
                        "calibration inputs; exclude it with layers={'exclude': [...]}"
                    )
    finally:
        handle.remove()
    return acc.result()


def _capture_input(model: nn.Module, module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The input rows of ``module`` when ``model`` runs on ``x`` (the forward stops at the layer)."""
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(input_rows(mod, args[0]))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            try:
                model(x)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not box:
        raise BrainsurgeonError(
            f"layer {name!r} is not called in the model's forward pass, so it has no calibration inputs; "
            "exclude it with layers={'exclude': [...]}"
        )
    return box[0]


def paired_input_stats(
    model: nn.Module, target: Target, reference: nn.Module, ref_module: nn.Module, calib: Calibration, track=None
) -> LayerInputStats:
    """H = (2/N) X X^T of ``target``'s inputs in ``model`` and the cross term G = (2/N) X_ref X^T with
    the same layer's inputs X_ref in ``reference`` (the dense network), batch by batch."""
    check_supported(target)
    acc = _Accumulator(target.weight_matrix().shape[1], target.weight.device, with_hessian=True, with_cross=True)
    batches = calib.batches if track is None else track(calib.batches, f"inputs of {target.name}", total=len(calib.batches))
    for x, _ in batches:
        rows = _capture_input(model, target.module, x, target.name)
        acc.add(rows, _capture_input(reference, ref_module, x, target.name))
    return acc.result()
