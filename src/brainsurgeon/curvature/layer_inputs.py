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
(the rest of the network is not needed). This is the layer-by-layer path (a prefix pass per
layer); ``brainsurgeon.sequential`` collects the same statistics block by block with the same
accumulator where the model's chain of blocks is known. A module called several times in one forward pass
(weight sharing) is therefore seen at its first call only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Calibration
from ..errors import BrainsurgeonError
from ..targets import Target, holder_modules, register_input_capture
from . import gram_kernel


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
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
        raise BrainsurgeonError(
            f"layer {target.name!r} is a grouped Conv2d (groups={m.groups}); layer-wise methods need "
            f"groups=1 (one input matrix shared by all filters). Exclude it with layers={{'exclude': ['{target.name}']}}"
        )


def input_rows(module: nn.Module, x: torch.Tensor, args: tuple | None = None) -> torch.Tensor:
    """The layer's input as rows of X^T: (N, in) for Linear, (B * L, C_in*kh*kw) patches for Conv2d."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        from .diagonal import conv1d_patches

        rows = conv1d_patches(module, x if x.dim() == 3 else x.unsqueeze(0))
        return rows.reshape(-1, rows.shape[-1])
    if isinstance(module, nn.MultiheadAttention):  # in_proj_weight: every row acts on the query/key/value input
        if args is None or len(args) < 3 or not (args[1] is args[0] and args[2] is args[0]):
            raise BrainsurgeonError(
                "layer-wise methods prune a MultiheadAttention's in_proj_weight for self-attention only (query, key "
                "and value the same tensor, passed positionally); exclude the layer's in_proj_weight otherwise"
            )
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


#: column-block width of :func:`add_gram`'s products
GRAM_BLOCK = 256


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += X^T X`` on and above the diagonal (acc float64, d x d; X n x d in its own dtype):
    the entries below the diagonal are left as they are, and :func:`mirror_upper` fills them in
    once the last rows are added. For column blocks B_1..B_k of width about ``GRAM_BLOCK``, the
    products X_Bi^T X_[Bi..] cover block row i from the diagonal on: (k + 1) / 2k of the full
    product's arithmetic (torch has no symmetric rank-k update), and each is added to acc as it
    comes (no float64 copy of it, nothing added transposed). Measured, 2 threads, float32 into
    float64, 4096 rows: d = 1536 (SmolLM2's down_proj) 105 ms for the full product, 82 ms for these
    blocks when the part below the diagonal was added transposed each time, 70 ms now; d = 576
    16.4, 12.5 and 12.0 ms. Neither SSYRK was faster: MKL's (reached through torch's library) took
    77 ms alone for d = 1536, and OpenBLAS's (scipy), whose threads spin between calls, slowed the
    forwards between the products (a calibration took 81 s instead of 55 s)."""
    d = x.shape[1]
    k = max(1, -(-d // GRAM_BLOCK))  # k = 1: the plain product
    edges = [i * d // k for i in range(k + 1)]
    for a0, a1 in zip(edges[:-1], edges[1:]):
        acc[a0:a1, a0:] += x[:, a0:a1].T @ x[:, a0:]  # block row i, from the diagonal block on


def mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """``acc`` made exactly symmetric from its upper triangle (in place; returned). A GEMM need not
    sum entry (i, j) of a diagonal block in the order of (j, i) (MKL on AVX2 does not), so the
    upper triangle is the one kept."""
    upper = acc.triu(1)
    acc.copy_(acc.triu() + upper.T)
    return acc


class _Accumulator:
    """Running float64 sums of X X^T (optional) and of the squared norms.

    Small batches are buffered until about ``FLUSH_ELEMENTS`` values are pending and then go
    through one matmul: fewer, larger products are faster, and each float64 addition of the
    in x in product is paid once per flush rather than once per batch. A batch of at least
    ``OWN_PRODUCT_ELEMENTS`` values (a batch of token windows) is its own product: the float64 sum
    is then a sum of per-batch products whatever batches came before, so ranks that each
    accumulate a contiguous shard of the batches and add their sums (``torch.distributed``) get
    the single process's H up to the order of float64 additions, not float32 rounding. Measured on
    SmolLM2-135M (sparsegpt 50%, 16 windows, batches of 4): 2 ranks x 1 thread give a model
    bit-identical to 1 process x 1 thread. (1 process at 2 threads is NOT the same reference:
    float32 GEMMs round differently with another thread count, and sparsegpt's masks then differ
    in about 2.5% of the entries.)"""

    FLUSH_ELEMENTS = 2**24  # 64 MiB of float32 rows
    OWN_PRODUCT_ELEMENTS = 2**20  # 4 MiB of float32 rows: a large enough matmul on its own

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
        low = not rows.is_floating_point() or rows.dtype in (torch.bfloat16, torch.float16)
        if low and not self._keeps_bf16(rows):
            rows = rows.float()  # bf16/fp16 products would round X^T X to 8/11 bits: form them in float32
        if self._pending and self._pending[0].dtype != rows.dtype:
            self._flush()
        self.rows += rows.shape[0]
        if self.xtx is None:
            self.sq += rows.to(torch.float64).square().sum(0)
        else:  # the squared norms are diag(X X^T): read them off at the end
            own = rows.numel() >= self.OWN_PRODUCT_ELEMENTS
            if own:
                self._flush()  # what came before, in order; then this batch alone
            self._pending.append(rows)
            if self.cross is not None:
                self._pending_ref.append(ref_rows.detach().to(rows.dtype))
            self._pending_elems += rows.numel()
            if own or self._pending_elems >= self.FLUSH_ELEMENTS:
                self._flush()

    def _keeps_bf16(self, rows: torch.Tensor) -> bool:
        """bfloat16 rows whose X^T X the AMX kernel forms as it stands (no float32 copy of the rows)."""
        return (rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and self.xtx is not None
                and self.cross is None and gram_kernel.available())

    def _flush(self) -> None:
        if not self._pending:
            return
        x = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_elems = [], 0
        if x.dtype == torch.bfloat16:  # exact bf16 products in float32 tiles (gram_kernel), summed in float64
            gram_kernel.add_gram_bf16(self.xtx, x)
        else:
            add_gram(self.xtx, x)  # fast products in the activations' dtype, summed in float64
        if self.cross is not None:
            ref = self._pending_ref[0] if len(self._pending_ref) == 1 else torch.cat(self._pending_ref)
            self._pending_ref = []
            self.cross += (ref.T @ x).to(torch.float64)

    def _reduce_ranks(self) -> None:
        """Under torch.distributed: the sums and the row count over every rank's shard (float64),
        before the normalisation by the total row count (see :mod:`brainsurgeon.distributed`)."""
        from ..distributed import all_reduce_count, all_reduce_sum, is_distributed

        if self.xtx is not None:
            self._flush()
        if not is_distributed():
            return
        self.rows = all_reduce_count(self.rows)
        if self.xtx is not None:
            self.xtx = all_reduce_sum(self.xtx)
        else:
            self.sq = all_reduce_sum(self.sq)
        if self.cross is not None:
            self.cross = all_reduce_sum(self.cross)

    def result(self) -> LayerInputStats:
        self._reduce_ranks()
        n = max(self.rows, 1)
        hessian = None
        if self.xtx is not None:
            mirror_upper(self.xtx)  # add_gram fills the upper triangle
            self.sq = torch.diagonal(self.xtx).clone()
            hessian = self.xtx.mul_(2.0 / n)
        cross = None if self.cross is None else self.cross.mul_(2.0 / n)
        return LayerInputStats(hessian=hessian, sq_norms=self.sq, num_rows=self.rows, cross=cross)


#: modules whose weight acts as a linear map on input rows (an Embedding holding a tied weight uses it
#: as a lookup table: no reconstruction objective, no input rows)
ROW_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def linear_holders(model: nn.Module, target: Target) -> list[nn.Module]:
    """``target.module`` and the other modules applying the same (tied) weight to input rows."""
    return [m for m in holder_modules(model, target) if m is target.module or isinstance(m, ROW_MODULES)]


def layer_input_stats(
    model: nn.Module, target: Target, calib: Calibration, with_hessian: bool = True, track=None
) -> LayerInputStats:
    """Run the calibration batches through ``model`` (as it is now: earlier layers may already be
    pruned) and collect the statistics of ``target``'s inputs, stopping each forward at the layer."""
    check_supported(target)
    dim = target.weight_matrix().shape[1]
    acc = _Accumulator(dim, target.weight.device, with_hessian)
    calls = {"n": 0, "stop": False}
    # A weight used more than once per forward (a tied weight, a module called twice) has one
    # objective per use: H sums the input rows of every use. The first batch runs to the end to
    # count the uses; with exactly one, later batches stop at the layer.
    holders = linear_holders(model, target)

    def on_rows(rows):
        calls["n"] += 1
        acc.add(rows)
        if calls["stop"]:
            raise _StopForward

    handles = [register_input_capture(model, m, on_rows) for m in holders]
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
                calls["stop"] = calls["stop"] or calls["n"] == 1
    finally:
        for handle in handles:
            handle.remove()
    return acc.result()


def first_input_rows(root: nn.Module, module: nn.Module, run: Callable[[], object], where: str) -> torch.Tensor:
    """The input rows of ``module`` at its first call while ``run()`` calls ``root`` (which contains
    it); the forward stops there. ``where`` names the pass for the error when ``module`` is never called."""
    box: list[torch.Tensor] = []

    def on_rows(rows):
        box.append(rows)
        raise _StopForward

    handle = register_input_capture(root, module, on_rows)  # out_proj of an attention: on the attention
    try:
        with torch.no_grad():
            try:
                run()
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not box:
        raise BrainsurgeonError(
            f"{where}, so it has no calibration inputs; exclude it with layers={{'exclude': [...]}}"
        )
    return box[0]


def _capture_input(model: nn.Module, module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The input rows of ``module`` when ``model`` runs on ``x`` (the forward stops at the layer)."""
    return first_input_rows(model, module, lambda: model(x), f"layer {name!r} is not called in the model's forward pass")


def _uses_per_forward(model: nn.Module, target: Target, x: torch.Tensor) -> int:
    """How often ``target``'s weight is applied to inputs in one forward pass (of one sample)."""
    uses = [0]

    def count(rows):
        uses[0] += 1

    handles = [register_input_capture(model, m, count) for m in linear_holders(model, target)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return uses[0]


def paired_input_stats(
    model: nn.Module, target: Target, reference: nn.Module, ref_module: nn.Module, calib: Calibration, track=None
) -> LayerInputStats:
    """H = (2/N) X X^T of ``target``'s inputs in ``model`` and the cross term G = (2/N) X_ref X^T with
    the same layer's inputs X_ref in ``reference`` (the dense network), batch by batch."""
    check_supported(target)
    if _uses_per_forward(model, target, calib.batches[0][0]) > 1:
        raise BrainsurgeonError(
            f"error correction fits one layer to its dense outputs, but {target.name}'s weight is used more than "
            "once per forward pass (tied, or its module called twice); pass error_correction=False"
        )
    acc = _Accumulator(target.weight_matrix().shape[1], target.weight.device, with_hessian=True, with_cross=True)
    batches = calib.batches if track is None else track(calib.batches, f"inputs of {target.name}", total=len(calib.batches))
    for x, _ in batches:
        rows = _capture_input(model, target.module, x, target.name)
        acc.add(rows, _capture_input(reference, ref_module, x, target.name))
    return acc.result()
