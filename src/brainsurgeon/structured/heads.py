"""Weight and first-order criteria for transformer heads and FFN neurons.

A head unit's weights are its q/k/v rows and o columns (with GQA: the key/value head's rows and
all its query heads'); a neuron's are its gate/up (fc1) rows and its down (fc2) column
(:mod:`.transformer`). These are the transformer forms of ``magnitude`` and ``taylor``
(``structure="channel"`` on an HF model selects them).
"""
from __future__ import annotations

import torch

from ..registry import register_variant
from .transformer import LayerUnits
from .transformer_engine import TransformerContext, TransformerMethod


def unit_sq_norms(u: LayerUnits) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared weights of each head unit, of each neuron), float64."""
    hd, per = u.head_dim, u.q_heads_per_unit
    o = u.o.weight_oi().detach().double()
    heads = o.pow(2).sum(0).view(u.num_head_units, per * hd).sum(1)
    if u.qkv is not None:
        w = u.qkv.weight_oi().detach().double().pow(2).sum(1).view(3, u.num_heads, hd).sum((0, 2))
        heads = heads + w
    else:
        q = u.q.weight_oi().detach().double().pow(2).sum(1).view(u.num_head_units, per * hd).sum(1)
        kv = sum(p.weight_oi().detach().double().pow(2).sum(1).view(u.num_kv_heads, hd).sum(1) for p in (u.k, u.v))
        if u.prune_query_heads:  # a query head alone does not own k/v rows
            kv = torch.zeros_like(q)
        heads = heads + q + kv
    down = u.mlp_out.weight_oi().detach().double().pow(2).sum(0)
    neurons = down + sum(p.weight_oi().detach().double().pow(2).sum(1) for p in u.mlp_in)
    return heads, neurons


@register_variant("magnitude", "transformer")
class HeadMagnitude(TransformerMethod):
    """Magnitude of the unit's weight group (Li et al. 2016, "Pruning Filters for Efficient
    ConvNets", L2 form; the group magnitude importance of Torch-Pruning's LLM pruning, Fang et al.
    2023, "DepGraph").

    importance_u = sqrt(sum_{q in group(u)} w_q^2) over every weight of the head (q/k/v rows, o
    columns) or neuron (gate/up rows, down column). For the global search each score is taken
    relative to the mean of its layer and unit type, times the unit's cost.
    """

    summary = "L2 norm of each head's q/k/v rows + o columns / each neuron's gate/up rows + down column."
    normalize = True

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        out = {}
        for u in tctx.layers:
            h, n = unit_sq_norms(u)
            out[u.heads_key], out[u.neurons_key] = h.sqrt(), n.sqrt()
        return out


@register_variant("taylor", "transformer")
class HeadTaylor(TransformerMethod):
    """First-order Taylor importance of the unit's mask variable (Molchanov et al. 2017,
    arXiv:1611.06440; on head masks: Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better
    than One?").

    Removing unit u takes its mask m_u from 1 to 0, changing the loss by about -dL/dm_u;
    importance_u = |(1/N) sum_n g_{n,u}| with g_n the per-sequence mask gradient (a loss estimate,
    compared across layers as it is).
    """

    summary = "Michel et al. 2019 / Molchanov et al. 2017: |mean dL/dm| of each head/neuron mask."

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        from .transformer_stats import mask_gradients

        return {k: g.mean(0).abs() for k, g in mask_gradients(tctx).items()}
