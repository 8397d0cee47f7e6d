"""LLM Surgeon: closed-form costs and updates against the explicit (G (x) A)^-1, exact counts of the
global threshold at every shot, the curvature re-estimated on the pruned model, HF models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.curvature.kfac import KFACFactors, damped
from brainsurgeon.pruners import llm_surgeon as ls
from brainsurgeon.targets import find_targets


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return m @ m.T / n


def problem(out=4, d=6, seed=0):
    """Damped factors, a weight [W | b] (last column the bias) and the explicit F_d^-1."""
    a, g = damped(KFACFactors("fc", random_spd(d, seed), random_spd(out, seed + 1), has_bias=True), 1e-2)
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return a, g, w, torch.linalg.inv(torch.kron(g.matrix, a.matrix))


def obs_solution(w: torch.Tensor, finv: torch.Tensor, q: torch.Tensor):
    """dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w and L_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q, explicitly."""
    flat = w.reshape(-1)
    z = torch.linalg.solve(finv[q][:, q], flat[q])
    return (flat - finv[:, q] @ z).reshape(w.shape), 0.5 * float(flat[q] @ z)


def test_single_weight_costs_and_updates_equal_the_explicit_inverse():
    a, g, w, finv = problem()
    n = w.shape[1] - 1
    costs = ls.weight_costs(w[:, :n], g, a)
    for i in range(w.shape[0]):
        for j in range(n):
            q = torch.tensor([i * w.shape[1] + j])
            w_new, loss = obs_solution(w, finv, q)
            assert float(costs[i, j]) == pytest.approx(loss, rel=1e-10)
            layer = ls._Shot(w=w, g=g, a=a, n=n)
            new = torch.zeros(w.shape[0], n, dtype=torch.bool)
            new[i, j] = True
            got, residual = ls.LLMSurgeon(cg_iters=500)._update(layer, new)
            torch.testing.assert_close(got, w_new, rtol=1e-8, atol=1e-10)
            assert ls.quadratic_increase(got - w, g, a) == pytest.approx(loss, rel=1e-8)


def test_correlated_update_of_scattered_weights_is_the_block_formula():
    a, g, w, finv = problem(out=5, d=7, seed=3)
    n = w.shape[1] - 1
    new = torch.zeros(w.shape[0], n, dtype=torch.bool)
    new[0, 1] = new[0, 3] = new[2, 0] = new[4, 5] = new[1, 1] = new[3, 2] = True
    q = torch.cat([new, torch.zeros(w.shape[0], 1, dtype=torch.bool)], 1).reshape(-1).nonzero().squeeze(1)
    w_new, loss = obs_solution(w, finv, q)
    got, residual = ls.LLMSurgeon(cg_iters=1000)._update(ls._Shot(w=w, g=g, a=a, n=n), new)
    assert residual < 1e-6
    torch.testing.assert_close(got, w_new, rtol=1e-6, atol=1e-8)
    assert torch.count_nonzero(got[:, :n][new]) == 0
    assert ls.quadratic_increase(got - w, g, a) == pytest.approx(loss, rel=1e-6)


def test_row_and_column_costs_and_updates_equal_the_explicit_inverse():
    a, g, w, finv = problem(out=5, d=6, seed=7)
    out, d = w.shape
    n = d - 1
    rows, cols = ls.row_costs(w, g, a), ls.column_costs(w, g, a, n)
    for i in range(out):
        q = torch.arange(i * d, (i + 1) * d)  # the whole row, bias included
        assert float(rows[i]) == pytest.approx(obs_solution(w, finv, q)[1], rel=1e-10)
    for j in range(n):
        q = torch.arange(j, out * d, d)
        assert float(cols[j]) == pytest.approx(obs_solution(w, finv, q)[1], rel=1e-10)
    r = torch.tensor([1, 3])
    q = torch.cat([torch.arange(i * d, (i + 1) * d) for i in r.tolist()])
    torch.testing.assert_close(ls.rows_update(w, r, g), obs_solution(w, finv, q)[0], rtol=1e-10, atol=1e-12)
    c = torch.tensor([0, 2, 4])
    q = torch.cat([torch.arange(j, out * d, d) for j in c.tolist()])
    torch.testing.assert_close(ls.columns_update(w, c, a), obs_solution(w, finv, q)[0], rtol=1e-10, atol=1e-12)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))


def data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_every_shot_reaches_its_target_exactly_and_the_curvature_is_re_estimated(monkeypatch, allocation):
    seen = []
    real = ls.kfac_factors

    def spy(model, targets, *args, **kwargs):
        seen.append({t.name: int((t.weight == 0).sum()) for t in targets})
        return real(model, targets, *args, **kwargs)

    monkeypatch.setattr(ls, "kfac_factors", spy)
    model = mlp()
    res = bs.prune(model, data(), "llm-surgeon", 0.7, allocation=allocation, shots=4)
    total = sum(t.weight.numel() for t in find_targets(model))
    shots = res.report["llm_surgeon"]["shots"]
    assert len(shots) == 4 and len(seen) == 4
    for k, shot in enumerate(shots, 1):
        assert shot["target_sparsity"] == pytest.approx(0.7 * k / 4)
        assert round(shot["sparsity"] * total) == round(0.7 * k / 4 * total)  # exact counts at every shot
        # the factors of shot k+1 are estimated on the model pruned by shots 1..k
        if k < 4:
            assert sum(seen[k].values()) == round(0.7 * k / 4 * total)
    zeros = {t.name: int((t.weight == 0).sum()) for t in find_targets(res.model)}
    assert sum(zeros.values()) == round(0.7 * total)
    if allocation == "uniform":
        assert all(z == round(0.7 * t.weight.numel()) for z, t in zip(zeros.values(), find_targets(model)))
    for t in find_targets(res.model):
        assert torch.equal(t.weight != 0, res.masks[t.name])
    assert sum(seen[0].values()) == 0  # the first shot sees the dense model


def test_global_threshold_picks_the_lowest_costs_over_all_layers():
    model = mlp()
    res = bs.prune(model, data(), "llm-surgeon", 0.6, allocation="global", shots=1, fisher="empirical")
    # one shot: the pruned set is exactly the round(0.6 n) lowest single-weight costs of the dense model
    from brainsurgeon.context import Numerics
    from brainsurgeon.curvature.kfac import kfac_factors, weight_with_bias
    from brainsurgeon.data import Calibration

    targets = find_targets(model)
    f = kfac_factors(model, targets, Calibration.from_data(data()), nn.CrossEntropyLoss(), "empirical")
    costs = []
    for t in targets:
        a, g = damped(f[t.name], 1e-2, Numerics())
        costs.append(ls.weight_costs(weight_with_bias(t)[:, : t.weight.shape[1]], g, a).reshape(-1))
    costs = torch.cat(costs)
    pruned = torch.cat([(~res.masks[t.name]).reshape(-1) for t in targets])
    k = round(0.6 * costs.numel())
    assert int(pruned.sum()) == k
    assert float(costs[pruned].max()) <= float(costs[~pruned].min())


@pytest.mark.parametrize("granularity", ["rows", "columns"])
def test_structured_granularities_remove_whole_rows_or_columns(granularity):
    model = mlp()
    res = bs.prune(model, data(), "llm-surgeon", 0.4, allocation="global", shots=2, granularity=granularity)
    total = sum(t.weight.numel() for t in find_targets(model))
    removed = 0
    for t in find_targets(res.model):
        m = res.masks[t.name]
        lines = m.all(1) | ~m.any(1) if granularity == "rows" else m.all(0) | ~m.any(0)
        assert lines.all()  # every row (column) is kept or removed whole
        assert m.any()  # no layer emptied
        removed += int((~m).sum())
    assert removed >= round(0.4 * total)
    largest = max(t.weight.shape[1] if granularity == "rows" else t.weight.shape[0] for t in find_targets(model))
    assert removed < round(0.4 * total) + largest  # the fewest structures reaching the target


def test_bad_options():
    with pytest.raises(bs.BrainsurgeonError, match="shots"):
        bs.prune(mlp(), data(), "llm-surgeon", 0.5, shots=0)
    with pytest.raises(bs.BrainsurgeonError, match="granularity"):
        bs.prune(mlp(), data(), "llm-surgeon", 0.5, granularity="heads")
    with pytest.raises(bs.BrainsurgeonError, match="fisher"):
        bs.prune(mlp(), data(), "llm-surgeon", 0.5, fisher="approx")


def test_runs_on_a_tiny_llama_and_beats_magnitude():
    transformers = pytest.importorskip("transformers")
    from brainsurgeon.adapters.hf import HFAdapter, TokenView, token_batches

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).double()
    # a trained model (random ones have nothing to lose): next tokens of shifted counting sequences
    ids = (torch.arange(16) + torch.arange(12)[:, None]) % 32
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    view = TokenView(model)
    batches = token_batches(ids, model, batch_size=4)
    names = HFAdapter(model).default_layers()

    def loss(m):
        with torch.no_grad():
            return sum(float(view.loss_fn(m(x), y)) for x, y in batches) / len(batches)

    res = bs.prune(view, batches, "llm-surgeon", 0.5, loss_fn=view.loss_fn, layers=names, allocation="global", shots=3)
    mag = bs.prune(view, batches, "magnitude", 0.5, loss_fn=view.loss_fn, layers=names, allocation="global")
    assert res.report["overall"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    dense = loss(view)
    assert dense < 1.0
    assert loss(res.model) - dense < 0.5 * (loss(mag.model) - dense)
