"""Gradient-based methods (obd, kfac-obd, kfac-obs, woodfisher) on tiny transformers (Llama, GPT-2,
BERT) through ``TokenView``, against brute force: per-sequence gradients by ``torch.func`` for the
Fisher diagonals, the exact GGN J^T J for the hidden-state loss, explicit per-token sums for the
K-FAC factors, the explicit Kronecker inverse for kfac-obs, the explicit block inverse for woodfisher."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev

import brainsurgeon as bs
from brainsurgeon.curvature.diagonal import diagonal_curvature
from brainsurgeon.curvature.kfac import damped, kfac_factors
from brainsurgeon.curvature.per_sample import PerSampleVectors
from brainsurgeon.curvature.sequence import MAX_EXACT_OUTPUTS, sample_model_targets
from brainsurgeon.data import Calibration
from brainsurgeon.engine import build_options, working_context

transformers = pytest.importorskip("transformers")
from brainsurgeon.adapters.hf import HFAdapter, TokenView, conv1d_to_linear, token_batches  # noqa: E402

VOCAB, LEN, N = 32, 6, 5


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    conv1d_to_linear(model)  # the methods see nn.Linear (out, in) matrices
    return model


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).double().eval()


def setup(make, n=N):
    model = make()
    ids = torch.randint(0, VOCAB, (n, LEN), generator=torch.Generator().manual_seed(1))
    view = TokenView(model)
    calib = Calibration(token_batches(ids, model, batch_size=n))
    names = HFAdapter(model).default_layers()
    targets = [t for t in bs.targets.find_targets(view) if t.name in names]
    return model, view, calib, targets


def per_sequence_grads(view, targets, x, y, loss_fn):
    """{name: (N, out, in)} gradients of each sequence's own loss (torch.func.grad, one sequence at a time)."""
    params = {f"{t.name}.weight": t.weight.detach() for t in targets}

    def loss(p, xi, yi):
        return loss_fn(functional_call(view, p, (xi[None],)), yi[None])

    rows = [grad(loss)(params, x[i], y[i]) for i in range(len(x))]
    return {t.name: torch.stack([r[f"{t.name}.weight"] for r in rows]) for t in targets}


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("kind", ["empirical", "fisher"])
def test_obd_diagonal_equals_squared_per_sequence_gradients(make, kind):
    model, view, calib, targets = setup(make)
    (x, y), = calib.batches
    diag = diagonal_curvature(view, targets, calib, view.loss_fn, kind, torch.Generator().manual_seed(3))
    if kind == "fisher":  # the same draws: one batch, the same seed
        with torch.no_grad():
            y = sample_model_targets(view.loss_fn, view(x), y, torch.Generator().manual_seed(3))
        assert not torch.equal(y[:, 1:], calib.batches[0][1][:, 1:])
    g = per_sequence_grads(view, targets, x, y, view.loss_fn)
    for t in targets:
        expected = (g[t.name] ** 2).mean(0)
        torch.testing.assert_close(diag[t.name], expected, rtol=1e-9, atol=1e-12 * float(expected.max()))


def test_exact_ggn_of_the_hidden_state_loss_is_jt_j():
    model, view, calib, targets = setup(bert)
    (x, y), = calib.batches
    diag = diagonal_curvature(view, targets, calib, view.loss_fn, "ggn")
    params = {f"{t.name}.weight": t.weight.detach() for t in targets}
    for t in targets[:3]:
        key = f"{t.name}.weight"
        jac = torch.stack([
            jacrev(lambda w, xi=x[i]: functional_call(view, {**params, key: w}, (xi[None],)))(params[key]) for i in range(len(x))
        ])  # (N, 1, L, H, out, in); the loss 1/2 |h - h_dense|^2 has Hessian I per sequence
        expected = (jac.reshape(len(x), -1, *t.weight.shape) ** 2).sum(1).mean(0)
        # the view's loss is computed in float32: the Hessian I is exact, its float32 rounding is not
        torch.testing.assert_close(diag[t.name], expected, rtol=1e-6, atol=1e-9 * float(expected.max()))


def test_exact_ggn_is_refused_for_large_outputs():
    model, view, calib, targets = setup(llama)
    big = [(x.repeat(1, 30), y.repeat(1, 30)) for x, y in calib.batches]  # 180 tokens x 32 > 4096
    assert big[0][0].shape[1] * VOCAB > MAX_EXACT_OUTPUTS
    with pytest.raises(bs.BrainsurgeonError, match="Monte-Carlo Fisher"):
        diagonal_curvature(view, targets, Calibration(big), view.loss_fn, "ggn")


def layer_io(view, target, x):
    box = {}

    def hook(m, a, out):
        box["a"], box["z"] = a[0].detach(), out

    h = target.module.register_forward_hook(hook)
    try:
        out = view(x)
    finally:
        h.remove()
    return box, out


@pytest.mark.parametrize("make", [llama, gpt2])
def test_kfac_factors_equal_explicit_per_token_sums(make):
    # A = (1/N) sum_i sum_t a_it a_it^T (+ bias column), S = (1/N) sum_i (1/T) sum_t s_it s_it^T,
    # s_it = d l_i / d z_it with l_i the sequence's own mean token loss
    model, view, calib, targets = setup(make)
    (x, y), = calib.batches
    factors = kfac_factors(view, targets, calib, view.loss_fn, "empirical")
    for t in targets[:: max(1, len(targets) // 4)]:
        A = S = 0
        for i in range(len(x)):
            with torch.enable_grad():
                box, out = layer_io(view, t, x[i : i + 1])
                (s,) = torch.autograd.grad(view.loss_fn(out, y[i : i + 1]), box["z"])
            a = box["a"][0]
            if t.module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            A = A + a.T @ a
            S = S + s[0].T @ s[0] / s.shape[1]
        f = factors[t.name]
        torch.testing.assert_close(f.A, A / len(x), rtol=1e-10, atol=1e-12 * float(f.A.abs().max()))
        torch.testing.assert_close(f.S, S / len(x), rtol=1e-8, atol=1e-10 * float(f.S.abs().max()))


def test_kfac_obs_compensation_is_the_explicit_kronecker_formula():
    model, view, calib, targets = setup(llama)
    name = "model.layers.1.mlp.down_proj"
    t = next(t for t in targets if t.name == name)
    f = kfac_factors(view, [t], calib, view.loss_fn, "empirical")[name]
    a, s = damped(f, 1e-2)
    res = bs.prune(
        view, calib.batches, "kfac-obs", 0.5, loss_fn=view.loss_fn, layers=[name], fisher="empirical",
        obs_steps=1, cg_iters=2000, num_samples=N,
    )
    w = t.weight.detach().reshape(-1)
    q = (~res.masks[name]).reshape(-1).nonzero().squeeze(1)
    finv = torch.linalg.inv(torch.kron(s.matrix, a.matrix))
    # one step: the lowest W^2 / (2 [S^-1]_ii [A^-1]_jj), jointly removed: dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q
    sal = w**2 / (2 * finv.diagonal())
    assert set(q.tolist()) == set(torch.argsort(sal, stable=True)[: q.numel()].tolist())
    expected = w - finv[:, q] @ torch.linalg.solve(finv[q][:, q], w[q])
    got = res.model.get_submodule(name).weight.detach().reshape(-1)
    # conjugate gradients stop at a relative residual of 1e-6 (test_kfac checks them to 1e-13)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(w.abs().max()))
    assert torch.count_nonzero(got[q]) == 0


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_woodfisher_inverse_is_the_explicit_block_inverse(curvature):
    from brainsurgeon.pruners.woodfisher import BlockLayout, WoodFisher

    model, view, calib, targets = setup(gpt2)
    names = [t.name for t in targets][:3]
    opts = build_options("woodfisher", 0.5, "unstructured", "uniform", 0.99, N, None, 0, "cpu", N)
    ctx = working_context(view, calib.batches, opts, names, view.loss_fn, False)
    wf = WoodFisher(block_size=8, curvature=curvature)
    psv = PerSampleVectors(ctx.model, ctx.targets, ctx.calib, ctx.loss_fn, curvature, ctx.generator)
    blocks = BlockLayout(psv.layout, 8)
    state = ctx.generator.get_state()
    inv = wf._inverse(ctx, psv, blocks)
    (x, y), = ctx.calib.batches
    if curvature == "fisher":
        ctx.generator.set_state(state)
        with torch.no_grad():
            y = sample_model_targets(view.loss_fn, ctx.model(x), y, ctx.generator)
    g = per_sequence_grads(ctx.model, ctx.targets, x, y, view.loss_fn)
    flat = torch.cat([g[t.name].reshape(len(x), -1) for t in ctx.targets], 1)
    padded = blocks.to_blocks(flat)  # (nb, N, 8)
    lam = torch.tensor([ctx.numerics.damping[f"woodfisher:{t.name}"] for t in ctx.targets], dtype=torch.float64)
    lam_b = lam[blocks.layer_of_block()]
    explicit = torch.linalg.inv(
        lam_b[:, None, None] * torch.eye(8, dtype=torch.float64) + padded.transpose(1, 2) @ padded / len(x)
    )
    torch.testing.assert_close(inv, explicit, rtol=1e-7, atol=1e-9 * float(explicit.abs().max()))


@pytest.mark.parametrize("make", [llama, gpt2, bert])
@pytest.mark.parametrize(
    "method, options",
    [("obd", {"curvature": "empirical"}), ("kfac-obd", {"fisher": "empirical"}), ("kfac-obs", {"obs_steps": 2}),
     ("woodfisher", {"block_size": 8, "obs_steps": 2, "curvature": "empirical"})],
)
def test_methods_run_on_tiny_transformers_with_exact_counts(make, method, options):
    model, view, calib, targets = setup(make)
    if make is bert and method == "obd":
        options = {"curvature": "ggn"}  # the hidden-state loss: the empirical Fisher is 0 at the dense point
    if make is bert and method == "kfac-obd":
        options = {"fisher": "true"}  # the Monte-Carlo GGN (Gaussian targets)
    if make is bert and method == "woodfisher":
        options = {**options, "curvature": "fisher"}
    before = copy.deepcopy(model.state_dict())
    names = [t.name for t in targets]
    res = bs.prune(view, calib.batches, method, 0.5, loss_fn=view.loss_fn, layers=names, **options)
    for t in bs.targets.find_targets(res.model, names):
        assert int((t.weight == 0).sum()) == round(0.5 * t.weight.numel()), t.name
        assert torch.isfinite(t.weight).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    if method == "woodfisher":  # per-sequence loops instead of vmap, and the report says so
        assert any("Python loop" in f for f in res.report["numerics"]["fallbacks"])


def test_monte_carlo_ggn_of_the_hidden_state_loss_back_propagates_gaussian_noise():
    # targets h + eps, eps ~ N(0, I): the signal d(1/2 |h - t|^2)/dh = -eps, E[eps eps^T] = I = the loss Hessian
    from brainsurgeon.curvature.sequence import sequence_signals

    model, view, calib, targets = setup(bert)
    (x, y), = calib.batches
    with torch.no_grad():
        out = view(x)
    signals = sequence_signals(view.loss_fn, out, y, "fisher", torch.Generator().manual_seed(5))
    eps = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert signals.shape == (1, *out.shape)
    torch.testing.assert_close(signals[0], -eps, rtol=1e-6, atol=1e-6)  # the view's loss runs in float32


def test_sampled_token_labels_follow_the_softmax():
    from brainsurgeon.curvature.sequence import _draw

    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0]]).repeat(40000, 1).reshape(8, 5000, 5)
    labels = _draw(logits, torch.Generator().manual_seed(0)).reshape(-1)
    p = torch.softmax(logits[0, 0].double(), -1)
    freq = torch.bincount(labels, minlength=5).double() / labels.numel()
    sigma = (p * (1 - p) / labels.numel()).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)
    assert int((labels == 3).sum()) == 0  # probability 0 is never drawn


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("method", ["obd", "kfac-obs", "woodfisher", "llm-surgeon"])
def test_bs_prune_takes_the_hf_model_itself(make, method):
    model = make() if make is llama else transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    ).double().eval()
    ids = torch.randint(0, VOCAB, (N, LEN), generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())
    options = {"block_size": 8} if method == "woodfisher" else {"shots": 2} if method == "llm-surgeon" else {}
    res = bs.prune(model, ids, method, 0.5, **options)
    assert res.report["overall"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "method, options",
    [("kfac-obd", {"fisher": "empirical"}), ("llm-surgeon", {}), ("woodfisher", {"block_size": 8}), ("obs", {"curvature": "empirical"})],
)
def test_empirical_fisher_of_the_hidden_state_loss_is_refused(method, options):
    # its targets are the dense outputs: zero gradient, zero empirical Fisher, nothing to rank by
    model, view, calib, targets = setup(bert)
    with pytest.raises(bs.BrainsurgeonError, match="zero at the dense model"):
        bs.prune(model, calib.batches[0][0], method, 0.5, **options)
