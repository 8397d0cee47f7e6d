"""Per-layer latency table for ``latency_target`` (Kwon et al. 2022, section 4.1: a lookup table of
the latency of an attention layer with h heads and an FFN with n neurons, measured once on the
target machine; latency is close to linear in h and n above a small count, so the search uses the
fitted slope as the cost of one unit).

The table times the layer's own matmuls at its own shapes on this machine (batch 1, prefill of
``seq_len`` tokens, the process's thread setting): q/k/v projections, causal scaled-dot-product
attention and o for h head units; gate/up/down (or fc1/fc2) and the activation for n neurons.
Layers with the same shapes share one measurement. ``dense_ms`` is the measured prefill latency
of the whole dense model, the reference of ``latency_target``.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .transformer import LayerUnits


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _attention_ms(u: LayerUnits, units: int, x: torch.Tensor) -> float:
    hd, q_heads = u.head_dim, units * u.q_heads_per_unit
    kv_heads = q_heads // u.group_size if not u.prune_query_heads else u.num_kv_heads
    hidden = x.shape[-1]
    wq = torch.randn(q_heads * hd, hidden)
    wkv = torch.randn(2 * kv_heads * hd, hidden)
    wo = torch.randn(hidden, q_heads * hd)

    def run():
        q = F.linear(x, wq).view(1, -1, q_heads, hd).transpose(1, 2)
        k, v = F.linear(x, wkv).view(1, -1, 2, kv_heads, hd).unbind(2)
        rep = q_heads // kv_heads
        k, v = (t.transpose(1, 2).repeat_interleave(rep, 1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.linear(a.transpose(1, 2).reshape(1, -1, q_heads * hd), wo)

    return _median_ms(run)


def _ffn_ms(u: LayerUnits, n: int, x: torch.Tensor) -> float:
    hidden = x.shape[-1]
    w_in = torch.randn(len(u.mlp_in) * n, hidden)
    w_out = torch.randn(hidden, n)

    def run():
        h = F.linear(x, w_in)
        if len(u.mlp_in) == 2:
            g, up = h.chunk(2, -1)
            h = F.silu(g) * up
        else:
            h = F.gelu(h)
        F.linear(h, w_out)

    return _median_ms(run)


def _slope(counts: list[int], ms: list[float]) -> float:
    """Least-squares slope of latency against the unit count (ms per unit), at least 0."""
    c = torch.tensor(counts, dtype=torch.float64)
    t = torch.tensor(ms, dtype=torch.float64)
    a = torch.stack([c, torch.ones_like(c)], 1)
    return max(float(torch.linalg.lstsq(a, t[:, None]).solution[0, 0]), 0.0)


def latency_costs(tctx, seq_len: int) -> dict:
    """{"head": [ms per head unit per layer], "neuron": [ms per neuron per layer], "dense_ms",
    "table": the measured points}."""
    from .transformer_engine import _prefill

    heads, neurons, table, cache = [], [], {}, {}
    with torch.no_grad():
        for u in tctx.layers:
            hidden = u.o.weight_oi().shape[0]
            shape = (hidden, u.num_head_units, u.q_heads_per_unit, u.head_dim, u.ffn_width, len(u.mlp_in))
            if shape not in cache:
                x = torch.randn(1, seq_len, hidden)
                hc = list(range(1, u.num_head_units + 1))
                h_ms = [_attention_ms(u, h, x) for h in hc]
                nc = sorted({max(1, round(u.ffn_width * f / 8)) for f in range(1, 9)})
                n_ms = [_ffn_ms(u, n, x) for n in nc]
                cache[shape] = (_slope(hc, h_ms), _slope(nc, n_ms))
                table[u.name] = {"heads": dict(zip(hc, h_ms)), "neurons": dict(zip(nc, n_ms))}
            heads.append(cache[shape][0])
            neurons.append(cache[shape][1])
        device = next(tctx.model.parameters()).device
        x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        dense_ms = _median_ms(lambda: _prefill(tctx.model, x), reps=3)
    return {"head": heads, "neuron": neurons, "dense_ms": dense_ms, "table": table}
