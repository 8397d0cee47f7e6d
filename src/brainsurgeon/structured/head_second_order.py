"""Second-order and reconstruction criteria for transformer heads and FFN neurons: the transformer
forms of ``obd`` (C-OBD), ``kfac-obs`` (C-OBS) and ``reconstruction``.

Every projection is seen as W (out x in; GPT-2's Conv1D transposed). A head unit removes rows R
of q/k/v (with their bias) and columns C of o; a neuron removes rows of gate/up (fc1) and a
column of down (fc2). Per-sequence gradients: the loss is the batch mean of the per-sequence
losses l_n, so B times the batch gradient of sequence n is d l_n.

C-OBD (LeCun et al. 1990, structured as in Wang et al. 2019): with the empirical Fisher diagonal
F_qq = (1/N) sum_n (d l_n / d w_q)^2, L_u = sum_{q in group(u)} 1/2 F_qq w_q^2.

C-OBS with K-FAC (Hassibi & Stork 1993; Martens & Grosse 2015; the row/column costs of LLM
Surgeon, van der Ouderaa et al. 2024, arXiv:2312.17244): per projection F ~ G (x) A with
A = E_t[a a^T] (inputs, a constant 1 appended where there is a bias) and G = (1/N) sum_{n,t}
g g^T (g = d l_n / d s_t, the output gradients), damped by ``damping`` (default 1e-2) times the
mean diagonal. Removing rows R or columns C:

    L_rows = 1/2 tr( ([G^-1]_RR)^-1 W_R A W_R^T ),     dW = -G^-1[:, R] ([G^-1]_RR)^-1 W_R
    L_cols = 1/2 tr( ([A^-1]_CC)^-1 W_C^T G W_C ),     dW = -W_C ([A^-1]_CC)^-1 A^-1[C, :]

A unit's score adds the costs of its row blocks and its column block (independent K-FAC blocks);
after the allocation the removed units of each layer are compensated jointly (one OBS step per
projection with all its removed rows / columns: the exact joint solution under F).
"""
from __future__ import annotations

import torch

from ..errors import BrainsurgeonError
from ..registry import register_variant
from .transformer import LayerUnits, Proj
from .transformer_engine import TransformerContext, TransformerMethod
from .transformer_stats import frozen

DEFAULT_KFAC_DAMPING = 1e-2


def _projections(u: LayerUnits) -> list[Proj]:
    attn = [u.qkv] if u.qkv is not None else [u.q, u.k, u.v]
    return attn + [u.o] + list(u.mlp_in) + [u.mlp_out]


def _with_one(a: torch.Tensor, proj: Proj) -> torch.Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], -1) if proj.bias is not None else a


def collect(tctx: TransformerContext, per_sample_fisher: bool, kfac: bool):
    """One forward/backward per batch with hooks on every projection: the empirical Fisher
    diagonal of [W | b] (``per_sample_fisher``) and/or the K-FAC factors A, G (``kfac``)."""
    projs = {p.name: p for u in tctx.layers for p in _projections(u)}
    diag, fa, fg, count = {}, {}, {}, {"tokens": 0, "n": 0}
    batch = [1]

    def fwd(name):
        def hook(module, args, out):
            a = args[0].detach()

            def grad_hook(g):
                g = g.detach().double() * batch[0]  # d l_n / d s
                aa = _with_one(a.double(), projs[name])
                if per_sample_fisher:
                    ps = torch.einsum("bto,bti->boi", g, aa)  # per-sequence gradient of [W | b]
                    diag[name] = diag.get(name, 0) + ps.pow(2).sum(0)
                if kfac:
                    af, gf = aa.reshape(-1, aa.shape[-1]), g.reshape(-1, g.shape[-1])
                    fa[name] = fa.get(name, 0) + af.T @ af
                    fg[name] = fg.get(name, 0) + gf.T @ gf
            out.register_hook(grad_hook)
        return hook

    emb = tctx.model.get_input_embeddings()
    handles = [p.module.register_forward_hook(fwd(n)) for n, p in projs.items()]
    handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with frozen(tctx.model), torch.enable_grad():
            for x, y in tctx.track(tctx.calib.batches, "curvature", len(tctx.calib.batches)):
                batch[0] = len(x)
                tctx.loss_fn(tctx.view(x), y).backward()
                count["n"] += len(x)
                count["tokens"] += x.shape[0] * x.shape[-1]
    finally:
        for h in handles:
            h.remove()
    n, t = count["n"], count["tokens"]
    return ({k: v / n for k, v in diag.items()}, {k: v / t for k, v in fa.items()}, {k: v / n for k, v in fg.items()})


def _w_oi(p: Proj) -> torch.Tensor:
    """[W | b] as (out, in (+1)) float64 on the CPU."""
    w = p.weight_oi().detach().double().cpu()
    return torch.cat([w, p.bias.detach().double().cpu()[:, None]], 1) if p.bias is not None else w


def _row_blocks(u: LayerUnits) -> list[tuple[Proj, torch.Tensor]]:
    """(projection, rows (units, k)) whose rows go with each head unit; k/v excluded for query heads."""
    hd, per = u.head_dim, u.q_heads_per_unit
    q_rows = torch.arange(u.num_heads * hd).view(u.num_head_units, per * hd)
    kv_rows = torch.arange(u.num_kv_heads * hd).view(u.num_kv_heads, hd)
    if u.qkv is not None:
        e = u.num_heads * hd
        return [(u.qkv, torch.cat([q_rows, kv_rows + e, kv_rows + 2 * e], 1))]
    blocks = [(u.q, q_rows)]
    if not u.prune_query_heads:
        blocks += [(u.k, kv_rows), (u.v, kv_rows)]
    return blocks


def unit_blocks(u: LayerUnits):
    """{kind: ([(proj, rows (units, k))], (proj, cols (units, c)))} for heads and neurons."""
    cols_h = torch.arange(u.num_heads * u.head_dim).view(u.num_head_units, -1)
    cols_n = torch.arange(u.ffn_width)[:, None]
    rows_n = [(p, torch.arange(u.ffn_width)[:, None]) for p in u.mlp_in]
    return {u.heads_key: (_row_blocks(u), (u.o, cols_h)), u.neurons_key: (rows_n, (u.mlp_out, cols_n))}


@register_variant("obd", "transformer")
class HeadOBD(TransformerMethod):
    """C-OBD for heads and FFN neurons (LeCun, Denker & Solla 1990; structured as C-OBD by Wang et al.
    2019): L_u = sum_{q in group(u)} 1/2 F_qq w_q^2 with the empirical Fisher diagonal
    F_qq = (1/N) sum_n (d l_n / d w_q)^2 (per-sequence gradients), the group being the unit's q/k/v
    rows and biases and o columns, or gate/up rows and down column."""

    summary = "C-OBD: 1/2 sum F_qq w_q^2 (empirical Fisher diagonal) over each head's / neuron's weights."

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        diag, _, _ = collect(tctx, per_sample_fisher=True, kfac=False)
        out = {}
        for u in tctx.layers:
            for key, (rows, (o, cols)) in unit_blocks(u).items():
                sal = lambda p: 0.5 * diag[p.name].cpu() * _w_oi(p).pow(2)  # noqa: E731
                s = sum(sal(p)[r.reshape(-1)].reshape(r.shape[0], -1).sum(1) for p, r in rows)
                so = sal(o)[:, : o.weight_oi().shape[1]]
                out[key] = s + so[:, cols.reshape(-1)].reshape(so.shape[0], cols.shape[0], -1).sum((0, 2))
        return out


def _inv(m: torch.Tensor, gamma: float, tctx, where: str) -> torch.Tensor:
    lam = gamma * float(torch.diagonal(m).mean().clamp_min(1e-30))
    tctx.numerics.damp(where, lam)
    return torch.linalg.inv(m + lam * torch.eye(len(m), dtype=m.dtype))


@register_variant("kfac-obs", "transformer")
class HeadKFACOBS(TransformerMethod):
    """C-OBS with K-FAC for heads and FFN neurons (Hassibi & Stork 1993; Martens & Grosse 2015; the
    row/column removal costs of LLM Surgeon, van der Ouderaa et al. 2024):
    L_rows = 1/2 tr(([G^-1]_RR)^-1 W_R A W_R^T), L_cols = 1/2 tr(([A^-1]_CC)^-1 W_C^T G W_C), summed
    over the unit's row blocks (q/k/v or gate/up) and its column block (o or down); the removed
    units of each layer are compensated jointly per projection (dW = -G^-1[:, R]([G^-1]_RR)^-1 W_R,
    dW = -W_C([A^-1]_CC)^-1 A^-1[C, :]). ``damping`` (default 1e-2) is relative to each factor's
    mean diagonal. Formulas in :mod:`brainsurgeon.structured.head_second_order`."""

    summary = "C-OBS (K-FAC, LLM Surgeon row/column costs) over heads/neurons, joint OBS compensation."

    def __init__(self):
        self._inv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        _, fa, fg = collect(tctx, per_sample_fisher=False, kfac=True)
        gamma = tctx.damping or DEFAULT_KFAC_DAMPING
        for name in fa:
            a, g = fa[name].cpu(), fg[name].cpu()
            self._inv[name] = (a, g, _inv(a, gamma, tctx, f"{name}.A"), _inv(g, gamma, tctx, f"{name}.G"))
        out = {}
        for u in tctx.layers:
            for key, (rows, (o, cols)) in unit_blocks(u).items():
                s = sum(self._row_costs(p, r) for p, r in rows)
                out[key] = (s + self._col_costs(o, cols)).clamp_min(0)
        return out

    def _row_costs(self, p: Proj, rows: torch.Tensor) -> torch.Tensor:
        a, _, _, g_inv = self._inv[p.name]
        w = _w_oi(p)
        out = []
        for r in rows:
            wr = w[r]
            out.append(0.5 * torch.trace(torch.linalg.solve(g_inv[r][:, r], wr @ a @ wr.T)))
        return torch.stack(out)

    def _col_costs(self, p: Proj, cols: torch.Tensor) -> torch.Tensor:
        _, g, a_inv, _ = self._inv[p.name]
        w = _w_oi(p)
        out = []
        for c in cols:
            wc = w[:, c]
            out.append(0.5 * torch.trace(torch.linalg.solve(a_inv[c][:, c], wc.T @ g @ wc)))
        return torch.stack(out)

    def compensate(self, tctx: TransformerContext, keep: dict[str, torch.Tensor]) -> None:
        for u in tctx.layers:
            for key, (rows, (o, cols)) in unit_blocks(u).items():
                dead = ~keep[key]
                if not dead.any():
                    continue
                for p, r in rows:  # every row block has one row of units per unit (query mode: no k/v block)
                    self._fix_rows(p, r[dead].reshape(-1))
                self._fix_cols(o, cols[dead].reshape(-1))

    def _fix_rows(self, p: Proj, r: torch.Tensor) -> None:
        if not len(r):
            return
        g_inv = self._inv[p.name][3]
        w = _w_oi(p)
        w = w - g_inv[:, r] @ torch.linalg.solve(g_inv[r][:, r], w[r])
        w[r] = 0.0
        _write(p, w)

    def _fix_cols(self, p: Proj, c: torch.Tensor) -> None:
        # W includes the bias column where there is one: the bias absorbs part of the compensation
        a_inv = self._inv[p.name][2]
        w = _w_oi(p)
        w = w - w[:, c] @ torch.linalg.solve(a_inv[c][:, c], a_inv[c, :])
        w[:, c] = 0.0
        _write(p, w)


def _write(p: Proj, w: torch.Tensor) -> None:
    n_in = p.weight_oi().shape[1]
    with torch.no_grad():
        p.weight_oi().copy_(w[:, :n_in].to(p.module.weight))
        if p.bias is not None and w.shape[1] > n_in:
            p.bias.copy_(w[:, n_in].to(p.bias))


@register_variant("reconstruction", "transformer")
class HeadReconstruction(TransformerMethod):
    """Reconstruction (ThiNet, Luo et al. 2017; He et al. 2017), block-sequential for transformers:
    a unit's score is the energy of its contribution to the residual stream,
    E_t ||W_{:,C(u)} x_{C(u)}(t)||^2 (o's columns of a head, down's column of a neuron; dense
    statistics); after the allocation the kept columns of o and down are refit layer by layer by
    least squares to the dense model's sublayer outputs from the pruned model's inputs,
    min_{W'_K} sum_t |W'_K x_K(t) - y(t)|^2 + lam |W'_K|^2 (lam = ``damping``, default 1e-4, times
    the mean diagonal). ``refit_samples``: sequences used by the refit (default all)."""

    summary = "ThiNet / He et al. 2017: contribution-energy selection + block-sequential LS refit of o/down."

    def __init__(self, refit_samples: int | None = None):
        if refit_samples is not None and (isinstance(refit_samples, bool) or not isinstance(refit_samples, int) or refit_samples < 1):
            raise BrainsurgeonError(f"reconstruction: refit_samples must be a positive integer, got {refit_samples!r}")
        self.refit_samples = refit_samples

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        from .transformer_stats import capture_inputs

        mods = {p.name: p for u in tctx.layers for p in (u.o, u.mlp_out)}
        moments = {}
        with capture_inputs({n: p.module for n, p in mods.items()}) as got, torch.no_grad():
            for x, _ in tctx.track(tctx.calib.batches, "contributions", len(tctx.calib.batches)):
                tctx.view(x)
                for n, xs in got.items():
                    xf = xs.pop().reshape(-1, xs_shape(mods[n])).float()
                    moments[n] = moments.get(n, 0) + (xf.T @ xf).double().cpu()
        out = {}
        for u in tctx.layers:
            for proj, key, per in ((u.o, u.heads_key, u.q_heads_per_unit * u.head_dim), (u.mlp_out, u.neurons_key, 1)):
                w = proj.weight_oi().detach().double().cpu()
                e = (moments[proj.name] * (w.T @ w))  # E <W_i x_i, W_j x_j> summed over tokens
                n = e.shape[0] // per
                out[key] = e.reshape(n, per, n, per).diagonal(dim1=0, dim2=2).sum((0, 1)).clamp_min(0)
        return out

    def compensate(self, tctx: TransformerContext, keep: dict[str, torch.Tensor]) -> None:
        from .fisher_mask import DEFAULT_RIDGE, tune_masks

        tune_masks(tctx, keep, tctx.damping or DEFAULT_RIDGE, self.refit_samples, refit_columns=True)


def xs_shape(p: Proj) -> int:
    return p.weight_oi().shape[1]
