"""Trust in the data path: every calibration batch checked up front, no silent truncation, no layer
emptied or silently skipped, tied parameters counted once, RNG untouched, numerics fallbacks reported.

Curvatures are checked against brute force: the GGN diagonal (1/N) sum_i diag(J_i^T H_i J_i) built
from ``torch.func.jacrev`` of a hand-written forward and ``torch.func.hessian`` of the loss.
"""
from __future__ import annotations

import copy
import importlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, tiny_data
from torch import nn
from torch.func import functional_call, hessian, jacrev

import brainsurgeon as bs
from brainsurgeon.curvature.diagonal import diagonal_curvature
from brainsurgeon.curvature.layer_inputs import layer_input_stats
from brainsurgeon.data import Calibration
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.targets import find_targets
from brainsurgeon.validation import DataWarning, calibrated_loss


def _brute_ggn_diag(forward, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss=F.cross_entropy) -> torch.Tensor:
    """(1/N) sum_i diag(J_i^T H_i J_i), J_i = d forward(w, x_i)/d w, H_i = d2 loss/d out2 (float64)."""
    w = w.detach().double()
    total = torch.zeros_like(w)
    for xi, yi in zip(x.double(), y):
        out = forward(w, xi.unsqueeze(0))[0]
        j = jacrev(lambda v: forward(v, xi.unsqueeze(0))[0])(w).reshape(out.numel(), -1)  # (C, n)
        h = hessian(lambda o: loss(o.unsqueeze(0), yi.unsqueeze(0)))(out)
        total += torch.einsum("cn,cd,dn->n", j, h, j).reshape(w.shape)
    return total / len(x)


# ----------------------------------------------------------------------------- every batch validated
def test_nan_in_a_late_sample_is_refused_naming_it(mlp_case):
    model, _ = mlp_case
    x, y = tiny_data((8,), n=800)
    x[700, 3] = float("nan")
    for method in ("obd", "wanda"):
        with pytest.raises(BrainsurgeonError, match=r"batch 5, sample 60 \(sample 700 "):
            bs.prune(model, (x, y), method, 0.5)


def test_label_out_of_range_in_batch_5_is_refused_before_work(mlp_case):
    model, (x, y) = mlp_case
    batches = [(x[i : i + 8], y[i : i + 8].clone()) for i in range(0, 48, 8)]
    batches[5][1][2] = NUM_CLASSES + 3
    for method, opts in (("obd", {"curvature": "empirical"}), ("greedy", {}), ("woodfisher", {})):
        with pytest.raises(BrainsurgeonError, match=r"batch 5, sample 2 .* class 7, outside \[0, 4\)"):
            bs.prune(model, batches, method, 0.5, **opts)


def test_negative_labels_and_ignore_index(mlp_case):
    model, (x, y) = mlp_case
    bad = y.clone()
    bad[40] = -1
    with pytest.raises(BrainsurgeonError, match=r"batch 2, sample 8 \(sample 40 .* class -1"):
        bs.prune(model, (x, bad), "obd", 0.5, batch_size=16)
    # -100 is CrossEntropyLoss's ignore_index: a legitimate label
    bad[40] = -100
    res = bs.prune(model, (x, bad), "magnitude", 0.5)
    assert res.report["overall"]["achieved_sparsity"] == 0.5


def test_inconsistent_batches_are_refused(mlp_case):
    model, (x, y) = mlp_case
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:].double(), y[32:])]
    with pytest.raises(BrainsurgeonError, match="batch 2 has inputs .* dtype torch.float64"):
        bs.prune(model, batches, "magnitude", 0.5)
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32].float())]
    with pytest.raises(BrainsurgeonError, match="batch 1 has targets"):
        bs.prune(model, batches, "magnitude", 0.5)


# ----------------------------------------------------------------------------- truncation
def test_all_data_used_by_default_and_truncation_reported(mlp_case):
    model, _ = mlp_case
    x, y = tiny_data((8,), n=1500)
    res = bs.prune(model, (x, y), "wanda", 0.5)
    assert res.report["calibration_samples"] == {"used": 1500, "given": 1500, "truncated": False}
    assert res.report["options"]["num_samples"] == 1500
    with pytest.warns(UserWarning, match="first 1000 of 1500 samples"):
        res = bs.prune(model, (x, y), "wanda", 0.5, num_samples=1000)
    assert res.report["calibration_samples"] == {"used": 1000, "given": 1500, "truncated": True}


def test_truncated_iterable_is_reported():
    x, y = tiny_data((8,), n=48)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    calib = Calibration.from_data(batches, num_samples=20)
    assert calib.num_samples == 20 and calib.truncated and calib.given is None
    calib = Calibration.from_data(iter(batches), num_samples=None)
    assert calib.summary() == {"used": 48, "given": 48, "truncated": False}


# ----------------------------------------------------------------------------- uniform cap
@pytest.mark.parametrize("method", ["magnitude", "obd", "sparsegpt", "wanda", "greedy"])
def test_uniform_allocation_never_empties_a_layer(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    x = torch.randn(64, 8)
    y = torch.randint(0, 10, (64,))
    with pytest.warns(UserWarning, match="max_layer_sparsity"):
        res = bs.prune(model, (x, y), method, 0.9999)
    for name, keep in res.masks.items():
        assert int(keep.sum()) == keep.numel() - int(0.99 * keep.numel()), name  # floor(0.99 n) pruned
    assert res.report["capped_layers"] == {"0": 0.99, "2": 0.99}
    assert res.report["layers"]["2"]["target_sparsity"] == 0.99


def test_rounding_is_not_reported_as_a_cap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 101), nn.ReLU(), nn.Linear(101, 10)).eval()
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # round(s * n) / n != s is no cap
        res = bs.prune(model, (x, y), "magnitude", 0.3675444679663241)
    assert "capped_layers" not in res.report


# ----------------------------------------------------------------------------- skipped / new layer kinds
def test_unprunable_weights_are_listed_and_warned():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.ConvTranspose1d(2, 2, 1), nn.Flatten(), nn.Linear(8, 4)
    )
    x, y = tiny_data((8,))
    with pytest.warns(UserWarning, match=r"2.weight \(ConvTranspose1d"):
        res = bs.prune(model, (x, y), "magnitude", 0.5)
    assert list(res.report["not_pruned"]) == ["2.weight"]
    # excluded on purpose: not listed
    res = bs.prune(model, (x, y), "magnitude", 0.5, layers={"exclude": ["2"]})
    assert res.report["not_pruned"] == {}


class _Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1, stride=2, dilation=1)
        self.head = nn.Linear(3 * 4, NUM_CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _conv1d_case():
    torch.manual_seed(0)
    x = torch.randn(24, 2, 8)
    y = torch.randint(0, NUM_CLASSES, (24,))
    return _Conv1dNet().eval(), x, y


def test_conv1d_obd_diagonal_matches_brute_force():
    model, x, y = _conv1d_case()
    targets = find_targets(model)
    assert [t.name for t in targets] == ["conv", "head"]
    diag = diagonal_curvature(model, targets, Calibration([(x, y)]), nn.CrossEntropyLoss())

    m = copy.deepcopy(model).double()

    def forward(w, xi):
        h = torch.tanh(F.conv1d(xi, w, m.conv.bias.detach(), stride=2, padding=1))
        return F.linear(h.flatten(1), m.head.weight.detach(), m.head.bias.detach())

    brute = _brute_ggn_diag(forward, model.conv.weight, x, y)
    torch.testing.assert_close(diag["conv"], brute, rtol=1e-5, atol=1e-10)


def test_conv1d_layer_hessian_matches_explicit_patches():
    model, x, y = _conv1d_case()
    t = find_targets(model, ["conv"])[0]
    stats = layer_input_stats(model, t, Calibration([(x, y)]))
    xp = F.pad(x.double(), (1, 1))
    rows = torch.stack([xp[:, :, 2 * p : 2 * p + 3].reshape(len(x), -1) for p in range(4)], 1).reshape(-1, 6)
    torch.testing.assert_close(stats.hessian, 2.0 / len(rows) * rows.T @ rows, rtol=1e-5, atol=1e-6)  # float32 products
    for method in ("sparsegpt", "obd", "magnitude"):
        res = bs.prune(model, (x, y), method, 0.5)
        assert res.report["layers"]["conv"]["achieved_sparsity"] == 0.5


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, NUM_CLASSES)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def _attention_case():
    torch.manual_seed(0)
    return _Attention().eval(), torch.randn(12, 3, 4), torch.randint(0, NUM_CLASSES, (12,))


def test_attention_obd_prunes_in_proj_and_out_proj_with_the_exact_ggn():
    model, x, y = _attention_case()
    res = bs.prune(model, (x, y), "obd", 0.5)  # KeyError: 'att.out_proj' before
    assert set(res.report["layers"]) == {"att.in_proj_weight", "att.out_proj", "head"}
    assert all(r["achieved_sparsity"] == 0.5 for r in res.report["layers"].values())
    targets = find_targets(model)
    diag = diagonal_curvature(model, targets, Calibration([(x, y)]), nn.CrossEntropyLoss())
    m = copy.deepcopy(model).double()
    for t in find_targets(m)[:2]:
        def forward(w, xi, pname=t.param_name):
            return functional_call(m, {pname: w}, (xi,))

        brute = _brute_ggn_diag(forward, t.weight, x, y)
        torch.testing.assert_close(diag[t.name], brute, rtol=1e-5, atol=1e-10)


def test_transformer_encoder_layer_prunes_in_proj():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(24, 4))
    model.eval()
    x, y = torch.randn(16, 3, 8), torch.randint(0, 4, (16,))
    names = [t.name for t in find_targets(model)]
    assert names[0] == "0.self_attn.in_proj_weight"
    for method in ("magnitude", "obd", "woodfisher"):
        res = bs.prune(model, (x, y), method, 0.5)
        assert res.report["layers"]["0.self_attn.in_proj_weight"]["achieved_sparsity"] == 0.5
        assert res.report["not_pruned"] == {}
    # layer-wise methods (this nn.Sequential takes the block-sequential path): in_proj from the
    # self-attention input
    res = bs.prune(model, (x, y), "sparsegpt", 0.5, layers={"exclude": ["*out_proj"]})
    assert res.report["layers"]["0.self_attn.in_proj_weight"]["achieved_sparsity"] == 0.5


def test_layerwise_in_proj_uses_the_self_attention_input():
    model, x, y = _attention_case()
    t = find_targets(model, ["att.in_proj_weight"])[0]
    stats = layer_input_stats(model, t, Calibration([(x, y)]))
    rows = x.reshape(-1, 4).double()
    torch.testing.assert_close(stats.hessian, 2.0 / len(rows) * rows.T @ rows, rtol=1e-5, atol=1e-6)  # float32 products
    res = bs.prune(model, (x, y), "sparsegpt", 0.5, layers={"exclude": ["att.out_proj"]})
    assert res.report["layers"]["att.in_proj_weight"]["achieved_sparsity"] == 0.5

    class Cross(_Attention):
        def forward(self, x):
            return self.head(self.att(x, x.flip(1), x.flip(1))[0].mean(1))

    with pytest.raises(BrainsurgeonError, match="self-attention only"):
        bs.prune(Cross().eval(), (x, y), "sparsegpt", 0.5, layers=["att.in_proj_weight"])


# ----------------------------------------------------------------------------- tied parameters
def _tied_case():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(40, 6)
    y = torch.randint(0, 3, (40,))
    return model, x, y


@pytest.mark.parametrize("method", ["random", "obd", "sparsegpt", "magnitude"])
def test_tied_parameter_is_one_target_counted_once(method):
    model, x, y = _tied_case()
    res = bs.prune(model, (x, y), method, 0.5)
    assert list(res.report["layers"]) == ["0", "4"]
    assert res.report["tied"] == {"0": ["2.weight"]}
    assert res.report["overall"]["achieved_sparsity"] == 0.5  # 0.75 / 0.69 / 0.53 before
    pruned = res.model
    assert pruned[0].weight is pruned[2].weight
    assert float((pruned[0].weight == 0).float().mean()) == 0.5
    assert model[0].weight.count_nonzero() == 36  # the user's model untouched


def test_tied_obd_saliency_matches_brute_force_ggn():
    model, x, y = _tied_case()
    targets = find_targets(model)
    diag = diagonal_curvature(model, targets, Calibration([(x, y)]), nn.CrossEntropyLoss())
    m = copy.deepcopy(model).double().requires_grad_(False)

    def forward(w, xi):  # both layers use the one tensor w, written out by hand
        h = torch.tanh(F.linear(xi, w, m[0].bias))
        h = torch.tanh(F.linear(h, w, m[2].bias))
        return F.linear(h, m[4].weight, m[4].bias)

    brute = _brute_ggn_diag(forward, m[0].weight, x, y)
    torch.testing.assert_close(diag["0"], brute, rtol=1e-5, atol=1e-10)
    # not the sum of the two layers' separate diagonals: the cross term 2 diag(J_a^T H J_b) counts
    res = bs.prune(model, (x, y), "obd", 0.5)
    expected = 0.5 * brute * m[0].weight.detach() ** 2
    keep = torch.ones(36, dtype=torch.bool)
    keep[torch.argsort(expected.reshape(-1), stable=True)[:18]] = False
    assert torch.equal(res.masks["0"], keep.reshape(6, 6))


# ----------------------------------------------------------------------------- RNG, numerics
def test_structured_pruning_leaves_the_global_rng_alone(cnn_case):
    model, data = cnn_case
    torch.manual_seed(123)
    state = torch.get_rng_state()
    bs.prune(model, data, "l1-norm", 0.5, structure="channel")
    assert torch.equal(torch.get_rng_state(), state)


def test_loss_that_breaks_vmap_falls_back_to_a_loop_and_says_so(mlp_case):
    model, (x, y) = mlp_case

    def picky_loss(out, target):  # data-dependent Python control flow: vmap cannot trace it
        if bool(torch.isfinite(out).all()):
            return F.cross_entropy(out, target)
        return out.sum() * 0

    for curvature in ("ggn", "empirical"):
        res = bs.prune(model, (x, y), "obd", 0.5, loss_fn=picky_loss, curvature=curvature)
        ref = bs.prune(model, (x, y), "obd", 0.5, curvature=curvature)
        assert any("per-sample loop" in f for f in res.report["numerics"]["fallbacks"])
        assert ref.report["numerics"]["fallbacks"] == []
        for name in ref.masks:
            assert torch.equal(res.masks[name], ref.masks[name])


def test_bfloat16_sparsegpt_accumulates_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).to(torch.bfloat16).eval()
    x = (torch.randn(512, 64) + 3.0).to(torch.bfloat16)  # a large mean: bf16 sums lose digits
    y = torch.randint(0, 4, (512,))
    t = find_targets(model)[0]
    stats = layer_input_stats(model, t, Calibration([(x, y)]))
    exact = 2.0 / len(x) * x.double().T @ x.double()
    assert float((stats.hessian - exact).abs().max() / exact.abs().max()) < 1e-6
    res = bs.prune(model, (x, y), "sparsegpt", 0.5)
    assert res.model[0].weight.dtype == torch.bfloat16
    assert res.report["overall"]["achieved_sparsity"] == 0.5


def test_class_weighted_cross_entropy_is_honoured_against_brute_force(mlp_case):
    """The GGN of torch's own weighted mean over the calibration set, ignore_index and label smoothing
    included: (sum_i w_i l_i) / (sum_i w_i), differentiated as one loss (no per-sample split)."""
    model, _ = mlp_case
    x, y = tiny_data((8,), n=24)
    y[3] = -100
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    base = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    calib = Calibration([(x[:10], y[:10]), (x[10:], y[10:])])
    loss = calibrated_loss(base, calib)
    t = find_targets(model)[1]
    diag = diagonal_curvature(model, find_targets(model), calib, loss, "ggn")[t.name]
    m = copy.deepcopy(model).double().requires_grad_(False)
    w0 = m.get_parameter(t.param_name)
    f = lambda w: functional_call(m, {t.param_name: w}, (x.double(),))  # noqa: E731
    full = nn.CrossEntropyLoss(weight=weight.double(), label_smoothing=0.1)
    out = f(w0)
    jac = jacrev(f)(w0).reshape(out.numel(), -1)
    h = hessian(lambda o: full(o.reshape(out.shape), y))(out.reshape(-1))
    brute = torch.einsum("an,ab,bn->n", jac, h, jac).reshape(w0.shape)
    torch.testing.assert_close(diag, brute, rtol=1e-5, atol=1e-9)
    # the class weights matter: the unweighted GGN differs
    plain = diagonal_curvature(model, find_targets(model), calib, nn.CrossEntropyLoss(label_smoothing=0.1), "ggn")
    assert float((plain[t.name] - brute).abs().max()) > 0.1 * float(brute.abs().max())
    for method, opts in (("obd", {}), ("kfac-obd", {"fisher": "exact"}), ("woodfisher", {})):
        res = bs.prune(model, (x, y), method, 0.5, loss_fn=base, **opts)
        assert res.report["overall"]["achieved_sparsity"] == 0.5
    # sampled labels have no data-label weight: refused, not silently unweighted
    with pytest.raises(BrainsurgeonError, match="class weights"):
        bs.prune(model, (x, y), "obd", 0.5, loss_fn=base, curvature="fisher")
    with pytest.raises(BrainsurgeonError, match="class weights"):
        bs.prune(model, (x, y), "kfac-obd", 0.5, loss_fn=base)
    with pytest.raises(BrainsurgeonError, match="per-sample normalisation"):  # never silently dropped
        diagonal_curvature(model, find_targets(model), calib, base, "ggn")


def test_onnx_tests_skip_without_the_extra(monkeypatch):
    """Without onnx installed the suite still collects: test_onnx.py skips itself, not a collection error."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # None in sys.modules: `import onnx` raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "test_onnx", raising=False)
    with pytest.raises(pytest.skip.Exception, match="onnx"):
        importlib.import_module("test_onnx")


class _ParallelTied(nn.Module):
    """Two tied producers added together: one group slices both identically, so the tie can stay."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.a(x) + self.b(x)))


@pytest.mark.parametrize("compact", [True, False])
def test_tied_weight_stays_tied_after_channel_pruning(compact):
    torch.manual_seed(0)
    model = _ParallelTied().eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    res = bs.prune(model, (x, y), "l1-norm", 0.5, structure="channel", compact=compact)
    pruned = res.model
    assert pruned.a.weight is pruned.b.weight
    keep = res.masks["a"]
    assert int(keep.sum()) == 4
    if compact:
        assert pruned.a.weight.shape == (4, 6) and pruned.b.bias.shape == (4,)
        torch.testing.assert_close(pruned.a.weight, model.a.weight[keep])
    with torch.no_grad():
        hidden = torch.relu(model.a(x) + model.b(x))[:, keep]
        torch.testing.assert_close(pruned(x), hidden @ model.head.weight[:, keep].T + model.head.bias)


def test_tie_that_cannot_be_sliced_consistently_is_held_fixed():
    model, x, y = _tied_case()  # W used in series: its rows and columns are different units
    with pytest.raises(BrainsurgeonError, match="tied weight of 0, 2"):
        bs.prune(model, (x, y), "l1-norm", 0.5, structure="channel")


def test_tied_layerwise_hessian_sums_the_inputs_of_every_holder():
    model, x, y = _tied_case()
    t = find_targets(model)[0]
    stats = layer_input_stats(model, t, Calibration([(x, y)]))
    with torch.no_grad():
        rows = torch.cat([x, torch.tanh(model[0](x))]).double()  # inputs of layer 0, then of its tie, layer 2
    torch.testing.assert_close(stats.hessian, 2.0 / len(rows) * rows.T @ rows, rtol=1e-5, atol=1e-6)
    assert stats.num_rows == 80

    class Wrapped(nn.Module):  # not an nn.Sequential: the layer-by-layer path (see the report on blocks)
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    with pytest.raises(BrainsurgeonError, match="used more than once.*error_correction=False"):
        bs.prune(Wrapped(), (x, y), "sparsegpt", 0.5, allocation="global")
    res = bs.prune(Wrapped(), (x, y), "sparsegpt", 0.5, allocation="global", error_correction=False)
    assert res.report["overall"]["achieved_sparsity"] == 0.5


def test_excluding_one_holder_of_a_tied_weight_excludes_the_weight():
    model, x, y = _tied_case()
    assert [t.name for t in find_targets(model, {"exclude": ["0"]})] == ["4"]
    assert [t.name for t in find_targets(model, {"exclude": ["2"]})] == ["4"]
    assert [(t.name, t.tied) for t in find_targets(model, ["2"])] == [("2", ("0.weight",))]
    with pytest.raises(BrainsurgeonError, match="tied to 2.weight"):  # K-FAC taps see one use only
        bs.prune(model, (x, y), "kfac-obd", 0.5)
    with pytest.warns(DataWarning, match="left dense") as caught:
        res = bs.prune(model, (x, y), "kfac-obd", 0.5, layers={"exclude": ["0"]})
    assert list(res.report["layers"]) == ["4"] and torch.equal(res.model[0].weight, model[0].weight)
    assert {w.filename for w in caught if w.category is DataWarning} == {__file__}  # the caller's line


def _heads_output(att: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, heads concatenated: out_proj's input, by hand (batch_first)."""
    e, h = att.embed_dim, att.num_heads
    q, k, v = F.linear(x, att.in_proj_weight, att.in_proj_bias).split(e, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (e // h) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], e)


def test_layerwise_out_proj_uses_the_attention_heads_output():
    model, x, y = _attention_case()
    t = find_targets(model, ["att.out_proj"])[0]
    stats = layer_input_stats(model, t, Calibration([(x, y)]))
    with torch.no_grad():
        rows = _heads_output(model.att, x).reshape(-1, 4).double()
    torch.testing.assert_close(stats.hessian, 2.0 / len(rows) * rows.T @ rows, rtol=1e-5, atol=1e-6)
    for method in ("sparsegpt", "wanda", "obc"):
        res = bs.prune(model, (x, y), method, 0.5)  # "att.out_proj is not called" before
        assert all(r["achieved_sparsity"] == 0.5 for r in res.report["layers"].values())
    res = bs.prune(model, (x, y), "sparsegpt", 0.5, allocation="global")  # error correction: dense heads too
    assert res.report["error_correction"] is True
    assert res.report["overall"]["achieved_sparsity"] == 0.5


class _TwiceCalled(nn.Module):
    """One Linear applied twice per forward (weight sharing by module reuse)."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_counts_both_uses():
    torch.manual_seed(0)
    model = _TwiceCalled().eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    t = find_targets(model)[0]
    stats = layer_input_stats(model, t, Calibration([(x[:20], y[:20]), (x[20:], y[20:])]))
    with torch.no_grad():
        rows = torch.cat([x, torch.tanh(model.shared(x))]).double()
    torch.testing.assert_close(stats.hessian, 2.0 / len(rows) * rows.T @ rows, rtol=1e-5, atol=1e-6)
    diag = diagonal_curvature(model, find_targets(model), Calibration([(x, y)]), nn.CrossEntropyLoss())
    m = copy.deepcopy(model).double().requires_grad_(False)

    def forward(w, xi):
        h = torch.tanh(F.linear(torch.tanh(F.linear(xi, w, m.shared.bias)), w, m.shared.bias))
        return m.head(h)

    torch.testing.assert_close(diag["shared"], _brute_ggn_diag(forward, m.shared.weight, x, y), rtol=1e-5, atol=1e-10)
    with pytest.raises(BrainsurgeonError, match="used more than once.*error_correction=False"):
        bs.prune(model, (x, y), "sparsegpt", 0.5, allocation="global")
    res = bs.prune(model, (x, y), "sparsegpt", 0.5, allocation="global", error_correction=False)
    assert res.report["overall"]["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("soft", [False, True])
def test_weighted_per_sample_losses_average_to_torchs_weighted_mean(soft):
    torch.manual_seed(0)
    out = torch.randn(6, 4, dtype=torch.float64)
    y = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1) if soft else torch.tensor([0, 1, 2, 3, 1, -100])
    for base in (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), label_smoothing=0.2),
                 nn.NLLLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))):
        if soft and isinstance(base, nn.NLLLoss):
            continue
        inputs = out.log_softmax(1) if isinstance(base, nn.NLLLoss) else out
        loss = calibrated_loss(base, Calibration([(inputs[:4], y[:4]), (inputs[4:], y[4:])]))
        mean = sum(loss.per_sample(inputs[i], y[i]) for i in range(6)) / 6
        torch.testing.assert_close(mean, base(inputs, y))
        torch.testing.assert_close(loss(inputs, y), base(inputs, y))  # a batch call is torch's own loss
