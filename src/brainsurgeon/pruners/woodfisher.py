"""WoodFisher: OBS with a block-diagonal empirical Fisher inverted by Woodbury (Singh & Alistarh 2020)."""
from __future__ import annotations

import math

import torch

from ..context import PruneContext
from ..curvature.inverse import outer_product_inverse, solve_spd
from ..curvature.per_sample import ParamLayout, PerSampleVectors
from ..curvature.sequence import check_empirical_is_informative
from ..distributed import all_reduce_count, all_reduce_sum, stream_from_ranks
from ..errors import MemoryBudgetError
from ..registry import register
from .base import PruningMethod
from .obs import (
    DEFAULT_BUDGET, check_curvature_option, check_positive_int, obs_saliency, relative_damping,
    step_prune_masks, two_pass, vectors, write_back,
)

DEFAULT_DAMPING = 1e-4
#: rank of one Woodbury step (r Sherman-Morrison steps folded into one matrix product)
UPDATE_RANK = 32
#: per-sample gradients streamed at once (float32): a full batch of 128 LeNet-300-100 gradients
CHUNK_BYTES = 160 * 2**20
#: blocks solved together in one removal step (bounds the temporaries to a few of them)
BLOCK_GROUP = 256


class BlockLayout:
    """Each layer's flattened weight cut into blocks of ``block_size`` consecutive weights.

    Blocks never cross layers; a layer's last block is padded. Padded coordinates carry no gradient,
    so in F_b = lam I + (1/m) sum g g^T they are decoupled (identity rows): the inverse over the real
    coordinates is exactly that of the unpadded block, and pads are never selected.
    """

    def __init__(self, layout: ParamLayout, block_size: int):
        self.layout, self.block_size = layout, block_size
        self.blocks_per_layer = [math.ceil(s.numel() / block_size) for s in layout.shapes]
        starts = [0]
        for nb in self.blocks_per_layer:
            starts.append(starts[-1] + nb)
        self.block_start = starts  # first block of each layer
        self.num_blocks = starts[-1]

    def padded_slice(self, i: int) -> slice:
        start = self.block_start[i] * self.block_size
        return slice(start, start + self.layout.shapes[i].numel())

    def to_padded(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(..., n) in target order -> (..., num_blocks * block_size)."""
        out = flat.new_full((*flat.shape[:-1], self.num_blocks * self.block_size), fill)
        for i in range(len(self.layout.shapes)):
            out[..., self.padded_slice(i)] = flat[..., self.layout.slice(i)]
        return out

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        return torch.cat([padded[..., self.padded_slice(i)] for i in range(len(self.layout.shapes))], dim=-1)

    def to_blocks(self, v: torch.Tensor) -> torch.Tensor:
        """Chunk of vectors (k, n) -> (num_blocks, k, block_size) for the batched recursion."""
        return self.to_padded(v).reshape(v.shape[0], self.num_blocks, self.block_size).transpose(0, 1)

    def layer_of_block(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.blocks_per_layer)), torch.tensor(self.blocks_per_layer))


def block_joint_update(inv: torch.Tensor, w: torch.Tensor, remove: torch.Tensor, numerics, where: str = "woodfisher"):
    """Joint OBS removal inside each block, for a batch of blocks, in place.

    For the set Q_b of each block (``remove``, (nb, B) bool):
        dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q,   L_Q = 1/2 w_Q^T (E_Q^T F^-1 E_Q)^-1 w_Q,
        F^-1 <- F^-1 - F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T F^-1   (Schur complement: removed stay removed).
    Variable |Q_b| is handled without gathering: S' = F^-1 on Q x Q and the identity elsewhere is
    block-diagonal with [F^-1]_QQ, so solving S' X = [w_Q, E_Q^T F^-1] (rows off Q zero) gives
    X = (E_Q^T F^-1 E_Q)^-1 [...] on Q and exactly zero elsewhere.

    ``inv`` (nb, B, B) and ``w`` (nb, B) are updated; returns the predicted loss increase.
    """
    m = remove.to(inv.dtype)
    pair = m.unsqueeze(2) * m.unsqueeze(1)
    eye = torch.eye(inv.shape[-1], dtype=inv.dtype, device=inv.device)
    s_prime = inv * pair + eye * (1.0 - m).unsqueeze(2)
    rhs = torch.cat([(w * m).unsqueeze(2), inv * m.unsqueeze(2)], dim=2)
    x = solve_spd(s_prime, rhs, numerics, where) * m.unsqueeze(2)  # rows off Q are zero
    loss = 0.5 * float(((w * m) * x[..., 0]).sum())
    w.sub_((inv @ x[..., :1]).squeeze(2))
    w.mul_(1.0 - m)  # removed weights are exactly zero
    inv.sub_(inv @ x[..., 1:])
    keep = 1.0 - m
    inv.mul_(keep.unsqueeze(2) * keep.unsqueeze(1))  # rows/columns of removed weights are exactly zero
    inv.copy_(0.5 * (inv + inv.transpose(1, 2)))
    return loss


@register("woodfisher")
class WoodFisher(PruningMethod):
    """WoodFisher (Singh & Alistarh 2020, "WoodFisher: Efficient Second-Order Approximation for
    Neural Network Compression").

    Block-diagonal empirical Fisher, one block per ``block_size`` consecutive flattened weights of a
    layer: F_b = lam I + (1/m) sum_i g_ib g_ib^T, g_i the per-sample loss gradients (or, with
    ``curvature="fisher"``, gradients at labels sampled from the model: the true Fisher). F_b^-1 is
    built from F_0^-1 = lam^-1 I by the Sherman-Morrison recursion
        F_{k+1}^-1 = F_k^-1 - F_k^-1 g g^T F_k^-1 / (m + g^T F_k^-1 g),
    batched over all blocks, with 32 rank-one steps folded into one Woodbury step (same matrix).
    lam = damping * mean diag of the layer's (1/m) sum g g^T (damping = the run's ``damping`` or 1e-4).

    Then OBS inside each block: L_q = w_q^2 / (2 [F^-1]_qq) (a loss increase, comparable across
    layers, so global allocation works), removal of the lowest jointly per block with
    dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q and a Schur-complement downdate, over ``obs_steps`` rounds.
    Memory is num_blocks * block_size^2 float64, never n x n.

    Options: ``block_size`` (default 64), ``obs_steps`` (default 16), ``curvature`` ("empirical" or
    "fisher"), ``max_memory_bytes`` (default 2 GiB).

    Sequence models (transformers through their token view): a sample is a sequence and g_i the
    gradient of its own loss (the mean over its tokens); the gradients come from a loop over the
    sequences, not ``torch.func.vmap`` (reported in ``numerics.fallbacks``), a chunk of a few at a
    time, never one per sample for the whole calibration set; ``curvature="fisher"`` samples a
    label per token from the model (see :mod:`brainsurgeon.curvature.sequence`).

    Defaults, measured on LeNet-300-100 (Fashion-MNIST, 20k-sample 3-epoch training, 85.4% test
    accuracy) at 90% uniform sparsity with 1024 samples, one CPU thread: block 64 / 16 steps gives
    82.7% in 32 s; block 128 / 4 steps 73.7% in 32 s; block 64 / 4 steps 74.2% in 21 s; one step
    6.3% (removing 90% at once leaves the quadratic model); damping 1e-2 falls to magnitude's level
    (23.7% vs 28.7%). The cost is ~8 n B m flops for the inverse and ~n B^2 per step, so block 64
    halves the statistics time of block 128 at no loss here.
    """

    summary = "WoodFisher (Singh & Alistarh 2020): block-diagonal empirical Fisher inverse, OBS updates."

    def __init__(
        self,
        block_size: int = 64,
        obs_steps: int = 16,
        curvature: str = "empirical",
        max_memory_bytes: int = DEFAULT_BUDGET,
    ):
        self.block_size = check_positive_int(block_size, "block_size")
        self.obs_steps = check_positive_int(obs_steps, "obs_steps")
        self.curvature = check_curvature_option(curvature, ("empirical", "fisher"))
        self.max_memory_bytes = check_positive_int(max_memory_bytes, "max_memory_bytes")

    def memory_needed(self, blocks: BlockLayout, batch_size: int) -> int:
        """The block inverses, the temporaries of one group of blocks in a removal step, and one
        streamed chunk of gradients (float32, then its padded float64 blocks, twice)."""
        per_block = 8 * self.block_size**2
        n, padded = blocks.layout.size, blocks.num_blocks * self.block_size
        chunk = min(batch_size, max(1, CHUNK_BYTES // (4 * n)))
        return per_block * (blocks.num_blocks + 3 * min(blocks.num_blocks, BLOCK_GROUP)) + chunk * (4 * n + 16 * padded)

    def validate(self, ctx: PruneContext) -> None:
        blocks = BlockLayout(ParamLayout.of(ctx.targets), self.block_size)
        need = self.memory_needed(blocks, max(len(x) for x, _ in ctx.calib.batches))
        if need > self.max_memory_bytes:
            raise MemoryBudgetError(
                f"woodfisher keeps {blocks.num_blocks} inverse blocks of {self.block_size}x{self.block_size} float64: "
                f"{need / 2**20:.1f} MiB ({need} bytes), over max_memory_bytes={self.max_memory_bytes}; "
                "lower block_size, prune fewer layers, raise max_memory_bytes, or use a method that scales to "
                f"{blocks.layout.size} weights (sparsegpt, wanda, obd with curvature='fisher', kfac-obd)"
            )
        vectors(ctx, self.curvature)  # bad curvature/loss combinations fail here
        check_empirical_is_informative(self.curvature, ctx.loss_fn, "curvature='fisher' (a Monte-Carlo GGN)")

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        psv = vectors(ctx, self.curvature, max_chunk_bytes=CHUNK_BYTES)
        blocks = BlockLayout(psv.layout, self.block_size)
        with ctx.timer("statistics"):
            inv = self._inverse(ctx, psv, blocks)
        with ctx.timer("solve"):
            w_flat = torch.cat([t.weight.detach().reshape(-1) for t in ctx.targets]).to(torch.float64)
            w = blocks.to_padded(w_flat).reshape(blocks.num_blocks, self.block_size)
            pruned, predicted, counts = self._prune(ctx, blocks, inv, w)
            write_back(ctx, psv.layout, blocks.from_padded(w.reshape(-1)))
        names = [t.name for t in ctx.targets]
        masks = dict(zip(names, psv.layout.split(blocks.from_padded(pruned.reshape(-1)))))
        if ctx.options.allocation == "global":
            ctx.extra_report["target_sparsity"] = {k: counts[k] / masks[k].numel() for k in names}
        ctx.extra_report["woodfisher"] = {
            "curvature": self.curvature, "block_size": self.block_size, "num_blocks": blocks.num_blocks,
            "obs_steps": self.obs_steps, "predicted_loss_increase": predicted,
        }
        return {k: ~m for k, m in masks.items()}

    def _inverse(self, ctx: PruneContext, psv: PerSampleVectors, blocks: BlockLayout) -> torch.Tensor:
        again = two_pass(ctx, psv)
        layout = psv.layout
        sq = torch.zeros(len(layout.shapes), dtype=torch.float64)
        for v in ctx.track(psv, "woodfisher: Fisher diagonal"):
            v2 = v.to(torch.float64).square()
            sq += torch.stack([v2[:, layout.slice(i)].sum() for i in range(len(layout.shapes))]).cpu()
        # several ranks: every rank's gradients count (distributed.py): summed squares, total count,
        # and below the inverse built from every rank's gradients in rank order (= one process's order)
        sq, num_samples = all_reduce_sum(sq), all_reduce_count(psv.num_samples)
        mean_diag = sq / torch.tensor([num_samples * s.numel() for s in layout.shapes], dtype=torch.float64)
        damping = ctx.options.damping if ctx.options.damping is not None else DEFAULT_DAMPING
        lam = relative_damping(mean_diag, damping, ctx.numerics, "woodfisher")
        for t, value in zip(ctx.targets, lam.tolist()):
            ctx.numerics.damp(f"woodfisher:{t.name}", value)
        lam_blocks = lam[blocks.layer_of_block()].to(ctx.device)
        chunks = ctx.track(stream_from_ranks(again), "woodfisher: Sherman-Morrison inverse")
        return outer_product_inverse(
            chunks, lam_blocks, self.block_size, num_samples, blocks.to_blocks, UPDATE_RANK
        )

    def _prune(self, ctx: PruneContext, blocks: BlockLayout, inv: torch.Tensor, w: torch.Tensor):
        layout, names = blocks.layout, [t.name for t in ctx.targets]
        pruned = torch.zeros_like(w, dtype=torch.bool)
        predicted, counts = 0.0, {}
        for step in ctx.track(range(1, self.obs_steps + 1), "woodfisher: prune", total=self.obs_steps):
            diag = self._positive_diag(ctx, inv.diagonal(dim1=1, dim2=2), pruned)
            scores = blocks.from_padded(obs_saliency(w, diag).reshape(-1))
            was = blocks.from_padded(pruned.reshape(-1))
            want, counts = step_prune_masks(
                dict(zip(names, layout.split(scores))), dict(zip(names, layout.split(was))),
                step, self.obs_steps, ctx.options,
            )
            flat_want = torch.cat([m.reshape(-1) for m in want.values()])
            new = blocks.to_padded(flat_want.to(torch.float64)).reshape_as(w).bool() & ~pruned
            touched = new.any(dim=1).nonzero().squeeze(1)
            for g in range(0, touched.numel(), BLOCK_GROUP):
                idx = touched[g : g + BLOCK_GROUP]
                inv_g, w_g = inv[idx], w[idx]
                predicted += block_joint_update(inv_g, w_g, new[idx], ctx.numerics)
                inv[idx], w[idx] = inv_g, w_g
            pruned |= new
        return pruned, predicted, counts

    @staticmethod
    def _positive_diag(ctx: PruneContext, d: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        """[F^-1]_qq > 0 for remaining weights in exact arithmetic; removed ones are 0 by design."""
        bad = ~(d > 0) & ~pruned
        if bad.any():
            ctx.numerics.fallback("woodfisher", f"{int(bad.sum())} non-positive [F^-1]_qq clamped (rounding)")
        return torch.where(d > 0, d, torch.full_like(d, torch.finfo(d.dtype).tiny))
