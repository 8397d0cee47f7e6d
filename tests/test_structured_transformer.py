"""Heads and FFN neurons of HF transformers: units, compaction == masking, budgets, errors, criteria math."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.adapters.hf import TokenView  # noqa: E402
from brainsurgeon.structured.transformer import MaskHooks, compact_units, layer_units, zero_units  # noqa: E402

VOCAB = 61


def tiny(family: str, **kw):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=kw.get("hidden", 32), intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kw.get("kv", 2), max_position_embeddings=64,
                                       attention_bias=kw.get("bias", False))
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if family == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=32)
        return transformers.OPTForCausalLM(cfg).eval()
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        return transformers.BertForMaskedLM(cfg).eval()
    raise ValueError(family)


def _randomize_biases(model):
    # HF initialises biases at zero; non-zero biases make the slicing of biases observable
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)


def _random_keep(layers, seed=0, empty_first=False):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for u in layers:
        kh = torch.rand(u.num_head_units, generator=g) > 0.4
        kh[0] = True
        if empty_first and u.index == 0:
            kh[:] = False
        kn = torch.rand(u.ffn_width, generator=g) > 0.5
        kn[0] = True
        keep[u.heads_key], keep[u.neurons_key] = kh, kn
    return keep


def _logits(model, x):
    with torch.no_grad():
        return TokenView(model)(x)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("empty", [False, True])
def test_compaction_equals_masking(family, empty):
    model = tiny(family)
    _randomize_biases(model)
    x = torch.randint(0, VOCAB, (2, 12))
    masked, compact = copy.deepcopy(model), copy.deepcopy(model)
    keep = _random_keep(layer_units(masked), empty_first=empty)
    zero_units(layer_units(masked), keep)
    skipped = compact_units(layer_units(compact), keep, allow_empty_attention=True)
    assert skipped == (["model.layers.0"] if empty and family == "llama" else skipped)
    assert bool(skipped) == empty
    ref, got = _logits(masked, x), _logits(compact, x)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in compact.parameters()) < n_before
    # the mask hooks with 0/1 masks compute the masked model as well
    with MaskHooks(layer_units(model), {k: v.float() for k, v in keep.items()}):
        hooked = _logits(model, x)
    assert torch.allclose(ref, hooked, atol=1e-5)


# ----------------------------------------------------------------------------- math against brute force
def test_mask_gradients_match_explicit_mask_tensors():
    """Per-sequence mask gradients == autograd of each sequence's own loss w.r.t. explicit masks."""
    from brainsurgeon.data import Calibration
    from brainsurgeon.adapters.hf import token_batches
    from brainsurgeon.structured.transformer_engine import TransformerContext
    from brainsurgeon.structured.transformer_stats import mask_gradients

    model = tiny("llama", kv=2)
    x = torch.randint(0, VOCAB, (5, 10))
    view = TokenView(model)
    layers = layer_units(model)
    tctx = TransformerContext(model, view, layers, Calibration(token_batches(x, model, batch_size=3)), view.loss_fn, None, 0)
    got = mask_gradients(tctx)
    for n in range(5):
        masks = {k: torch.ones(u.num_head_units if k.endswith("heads") else u.ffn_width, dtype=torch.float64, requires_grad=True)
                 for u in layers for k in (u.heads_key, u.neurons_key)}
        with MaskHooks(layers, {k: v for k, v in masks.items()}):
            loss = view.loss_fn(view(x[n:n + 1]), x[n:n + 1])
        grads = torch.autograd.grad(loss, list(masks.values()))
        for (k, _), g in zip(masks.items(), grads):
            assert torch.allclose(got[k][n], g, atol=1e-5, rtol=1e-4), k


def test_budget_search_is_optimal_against_enumeration():
    """Kwon et al.'s search == the best of every capped choice of heads and neurons (tiny instance)."""
    import itertools

    from brainsurgeon.structured.transformer_alloc import Candidates, global_counts

    g = torch.Generator().manual_seed(3)
    heads = Candidates([torch.sort(torch.rand(3, generator=g, dtype=torch.float64)).values for _ in range(2)], [5.0, 5.0], [2, 2])
    neurons = Candidates([torch.sort(torch.rand(4, generator=g, dtype=torch.float64)).values for _ in range(2)], [2.0, 2.0], [3, 3])
    for remove in (3.0, 9.0, 14.0, 21.0):
        h, n = global_counts(heads, neurons, remove)
        got = sum(heads.scores[i][:h[i]].sum() for i in range(2)) + sum(neurons.scores[i][:n[i]].sum() for i in range(2))
        assert sum(a * 5 for a in h) + sum(b * 2 for b in n) >= remove
        best = min(
            sum(heads.scores[i][:c[i]].sum() for i in range(2)) + sum(neurons.scores[i][:c[2 + i]].sum() for i in range(2))
            for c in itertools.product(range(3), range(3), range(4), range(4))
            if 5 * (c[0] + c[1]) + 2 * (c[2] + c[3]) >= remove
        )
        assert float(got) == pytest.approx(float(best), abs=1e-12)


def test_mask_tuning_normal_equations_match_lstsq():
    """G m = b of the mask tuning == least squares over the explicit unit contributions."""
    from brainsurgeon.structured.fisher_mask import _accumulate

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)  # out x in, 4 units of 2 columns
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    ys = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    kept = torch.tensor([True, False, True, True])
    gram, rhs, idx = _accumulate(xs, w, ys, 2, kept)
    cols = [torch.arange(2 * u, 2 * u + 2) for u in idx.tolist()]
    x = torch.cat([t.reshape(-1, 8) for t in xs]).double()
    y = torch.cat([t.reshape(-1, 6) for t in ys]).double()
    contrib = torch.stack([(x[:, c] @ w.double()[:, c].T).reshape(-1) for c in cols], 1)
    expected = torch.linalg.lstsq(contrib, y.reshape(-1, 1)).solution.squeeze(1)
    assert torch.allclose(torch.linalg.solve(gram, rhs), expected, atol=1e-8)


def test_flap_bias_compensation_is_the_mean_contribution():
    """FLAP: pruned model output == dense output when the removed units' inputs are constant."""
    from brainsurgeon.structured.flap import input_moments

    model = tiny("opt")
    x = torch.randint(0, VOCAB, (6, 12))
    res = bs.prune(model, x, "flap", 0.3, structure="channel", allocation="global", measure_latency=False)
    assert res.report["overall"]["achieved_sparsity"] >= 0.3
    # bias change of fc2 in layer 0 equals W[:, removed] @ mean(x_removed)
    work = copy.deepcopy(model)
    from brainsurgeon.structured.transformer_engine import TransformerContext
    from brainsurgeon.data import Calibration
    from brainsurgeon.adapters.hf import token_batches

    view = TokenView(work)
    layers = layer_units(work)
    tctx = TransformerContext(work, view, layers, Calibration(token_batches(x, work, batch_size=8)), view.loss_fn, None, 0)
    mean = input_moments(tctx)[layers[0].mlp_out.name][0]
    dead = ~res.masks[layers[0].neurons_key]
    w = model.model.decoder.layers[0].fc2.weight.detach().double()
    expected = model.model.decoder.layers[0].fc2.bias.detach().double() + w[:, dead] @ mean[dead]
    assert torch.allclose(res.model.model.decoder.layers[0].fc2.bias.double(), expected, atol=1e-5)


# ----------------------------------------------------------------------------- the public path
@pytest.mark.parametrize("method", ["magnitude", "taylor", "fisher-mask", "flap"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_compact_equals_masked(method, family):
    model = tiny(family)
    x = torch.randint(0, VOCAB, (6, 12))
    kw = dict(structure="channel", allocation="global", measure_latency=False, batch_size=3)
    a = bs.prune(model, x, method, 0.3, **kw)
    b = bs.prune(model, x, method, 0.3, compact=False, **kw)
    assert type(a.model) is type(model)
    assert a.report["overall"]["achieved_sparsity"] >= 0.3 - 1e-9
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert torch.allclose(_logits(a.model, x), _logits(b.model, x), atol=1e-5)
    assert sum(p.numel() for p in a.model.parameters()) < sum(p.numel() for p in model.parameters())
    # the user's model is untouched
    assert torch.allclose(_logits(model, x), _logits(tiny(family), x))


def test_flops_target_met_and_generate_runs():
    model = tiny("llama")
    x = torch.randint(0, VOCAB, (6, 12))
    res = bs.prune(model, x, "fisher-mask", structure="channel", allocation="global", flops_target=0.6)
    cost = res.report["cost"]
    assert cost["flops_ratio"] <= 0.6 + 1e-6
    assert {"prefill", "decode"} <= set(cost["speedup"])
    out = res.model.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_uniform_config_loads_in_plain_transformers(tmp_path):
    model = tiny("llama", kv=4, hidden=48)  # head_dim 12; 3 heads still divide the hidden size
    x = torch.randint(0, VOCAB, (6, 12))
    res = bs.prune(model, x, "magnitude", 0.25, structure="channel", allocation="uniform", uniform=True, measure_latency=False)
    res.model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_attention_heads == 3
    assert torch.allclose(_logits(again, x), _logits(res.model, x), atol=1e-6)


def test_query_heads_within_gqa_groups():
    model = tiny("llama", kv=2)
    x = torch.randint(0, VOCAB, (6, 12))
    kw = dict(structure="channel", allocation="uniform", measure_latency=False, prune_query_heads=True)
    a = bs.prune(model, x, "taylor", 0.3, **kw)
    b = bs.prune(model, x, "taylor", 0.3, compact=False, **kw)
    for name, r in a.report["layers"].items():
        assert r["heads_after"] % r["kv_heads_after"] == 0
    assert torch.allclose(_logits(a.model, x), _logits(b.model, x), atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_errors_are_one_line_and_early():
    model = tiny("llama")
    x = torch.randint(0, VOCAB, (4, 12))
    with pytest.raises(bs.BrainsurgeonError, match="per-layer caps allow"):
        bs.prune(model, x, "fisher-mask", structure="channel", allocation="global", flops_target=0.05)
    with pytest.raises(bs.BrainsurgeonError, match="exactly one budget"):
        bs.prune(model, x, "magnitude", 0.2, structure="channel", flops_target=0.5)
    with pytest.raises(bs.BrainsurgeonError, match="no head/FFN-neuron form"):
        bs.prune(model, x, "sparsegpt", 0.2, structure="channel")
    with pytest.raises(bs.BrainsurgeonError, match="allow_empty_attention"):
        layers = layer_units(copy.deepcopy(model))
        keep = _random_keep(layers, empty_first=True)
        compact_units(layers, keep)
    from brainsurgeon.models import build_model, make_spec

    mlp = build_model(make_spec("lenet300", input_shape=(1, 8, 8)))
    with pytest.raises(bs.BrainsurgeonError, match="Hugging Face transformers"):
        bs.prune(mlp, (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), "fisher-mask", 0.2, structure="channel")


def test_allow_empty_attention_reported():
    model = tiny("llama", kv=4)
    x = torch.randint(0, VOCAB, (4, 12))
    res = bs.prune(model, x, "magnitude", 0.6, structure="channel", allocation="global", allow_empty_attention=True,
                   max_layer_sparsity=0.95, measure_latency=False)
    b = bs.prune(model, x, "magnitude", 0.6, structure="channel", allocation="global", allow_empty_attention=True,
                 max_layer_sparsity=0.95, measure_latency=False, compact=False)
    assert torch.allclose(_logits(res.model, x), _logits(b.model, x), atol=1e-5)
    if res.report["attention_skipped"]:
        assert any("attention skipped" in n for n in res.report["notes"])


def test_latency_target_uses_a_measured_table():
    model = tiny("llama")
    x = torch.randint(0, VOCAB, (4, 12))
    res = bs.prune(model, x, "flap", structure="channel", allocation="global", latency_target=0.995, measure_latency=False)
    table = res.report["latency_table"]
    assert table["dense_ms"] > 0 and len(table["head"]) == 2 and all(s >= 0 for s in table["neuron"])
    removed = sum(
        (r["heads_before"] - r["heads_after"]) / 2 * table["head"][i] + (r["ffn_before"] - r["ffn_after"]) * table["neuron"][i]
        for i, r in enumerate(res.report["layers"].values())
    )
    assert removed >= 0.005 * table["dense_ms"] * (1 - 1e-6)


def test_kfac_obs_group_cost_matches_explicit_kronecker():
    """C-OBS row/column costs == 1/2 w_Q^T (E_Q^T F^-1 E_Q)^-1 w_Q with F = G (x) A built explicitly."""
    from brainsurgeon.structured.head_second_order import HeadKFACOBS
    from brainsurgeon.structured.transformer import Proj

    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 4, generator=g))
    xa, xg = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 6, generator=g, dtype=torch.float64)
    a, gm = xa.T @ xa / 20, xg.T @ xg / 20
    m = HeadKFACOBS()
    m._inv["p"] = (a, gm, torch.linalg.inv(a), torch.linalg.inv(gm))
    p = Proj("p", lin)
    f_inv = torch.kron(torch.linalg.inv(gm), torch.linalg.inv(a))  # row-major vec(W): F = G (x) A
    w = lin.weight.detach().double().reshape(-1)

    def brute(idx):
        q = torch.tensor(idx)
        return 0.5 * w[q] @ torch.linalg.solve(f_inv[q][:, q], w[q])

    rows = torch.tensor([[0, 3], [1, 2]])
    got = m._row_costs(p, rows)
    for k, r in enumerate(rows.tolist()):
        assert float(got[k]) == pytest.approx(float(brute([i * 4 + j for i in r for j in range(4)])), rel=1e-9)
    cols = torch.tensor([[1], [0, ]])
    got = m._col_costs(p, cols)
    for k, c in enumerate(cols.tolist()):
        assert float(got[k]) == pytest.approx(float(brute([i * 4 + j for i in range(6) for j in c])), rel=1e-9)
    # the joint compensation is the OBS update: removed weights zero, dW = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q
    q = torch.tensor([i * 4 + 1 for i in range(6)])
    expected = w - f_inv[:, q] @ torch.linalg.solve(f_inv[q][:, q], w[q])
    m._fix_cols(p, torch.tensor([1]))
    assert torch.allclose(lin.weight.detach().double().reshape(-1), expected.float().double(), atol=1e-5)


@pytest.mark.parametrize("method", ["obd", "kfac-obs"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_second_order_criteria_run_and_compact(method, family):
    model = tiny(family)
    x = torch.randint(0, VOCAB, (6, 12))
    kw = dict(structure="channel", allocation="global", measure_latency=False, batch_size=3)
    a = bs.prune(model, x, method, 0.3, **kw)
    b = bs.prune(model, x, method, 0.3, compact=False, **kw)
    assert torch.allclose(_logits(a.model, x), _logits(b.model, x), atol=1e-5)
    assert a.report["overall"]["achieved_sparsity"] >= 0.3 - 1e-9


def test_obd_fisher_diagonal_matches_per_sequence_autograd():
    from brainsurgeon.adapters.hf import token_batches
    from brainsurgeon.data import Calibration
    from brainsurgeon.structured.head_second_order import collect
    from brainsurgeon.structured.transformer_engine import TransformerContext

    model = tiny("gpt2")
    _randomize_biases(model)
    x = torch.randint(0, VOCAB, (4, 10))
    view = TokenView(model)
    layers = layer_units(model)
    tctx = TransformerContext(model, view, layers, Calibration(token_batches(x, model, batch_size=2)), view.loss_fn, None, 0)
    diag, _, _ = collect(tctx, per_sample_fisher=True, kfac=False)
    proj = layers[1].mlp_in[0]  # a Conv1D: weight (in, out)
    sq = 0
    for n in range(4):
        gw, gb = torch.autograd.grad(view.loss_fn(view(x[n:n + 1]), x[n:n + 1]), [proj.module.weight, proj.module.bias])
        sq = sq + torch.cat([gw.T, gb[:, None]], 1).double().pow(2)
    assert torch.allclose(diag[proj.name], sq / 4, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reconstruction_refit_lowers_the_output_error(family):
    model = tiny(family)
    x = torch.randint(0, VOCAB, (6, 12))
    kw = dict(structure="channel", allocation="global", measure_latency=False, batch_size=3)
    a = bs.prune(model, x, "reconstruction", 0.3, **kw)
    b = bs.prune(model, x, "reconstruction", 0.3, compact=False, **kw)
    assert torch.allclose(_logits(a.model, x), _logits(b.model, x), atol=1e-5)
    # the same units without the refit: zeroed only
    plain = copy.deepcopy(model)
    zero_units(layer_units(plain), a.masks)
    dense = _logits(model, x)
    assert (_logits(a.model, x) - dense).pow(2).mean() < (_logits(plain, x) - dense).pow(2).mean()


def test_trained_bert_compaction_equals_masking():
    """A tiny BERT trained on a synthetic task (is token 7 in the sequence?): pruning its heads and
    FFN neurons compactly gives the masked model's outputs, and the model keeps most of its skill."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, VOCAB, (256, 10), generator=g)
    labels = torch.randint(0, 2, (256,), generator=g)
    pos = torch.randint(0, 10, (256,), generator=g)
    ids[labels == 1, pos[labels == 1]] = 7
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        i = torch.randint(0, 256, (32,), generator=g)
        loss = model(input_ids=ids[i], labels=labels[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean()
    assert acc > 0.9
    data = {"input_ids": ids[:64], "labels": labels[:64]}
    kw = dict(structure="channel", allocation="global", measure_latency=False)
    a = bs.prune(model, data, "fisher-mask", 0.3, **kw)
    b = bs.prune(model, data, "fisher-mask", 0.3, compact=False, **kw)
    with torch.no_grad():
        la, lb = a.model(input_ids=ids).logits, b.model(input_ids=ids).logits
    assert torch.allclose(la, lb, atol=1e-5)
    assert a.model.bert.encoder.layer[0].attention.self.query.out_features <= 32
    assert sum(p.numel() for p in a.model.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_layer_structure_rebuilds_the_pruned_shapes(family):
    """A model built from the dense config, shaped by the stored per-layer structure, loads the
    pruned state dict strictly and gives identical outputs (what a loader needs)."""
    from brainsurgeon.structured.transformer import apply_layer_structure, layer_structure

    model = tiny(family)
    _randomize_biases(model)
    x = torch.randint(0, VOCAB, (2, 12))
    pruned = copy.deepcopy(model)
    layers = layer_units(pruned)
    keep = _random_keep(layers, seed=4, empty_first=True)
    compact_units(layers, keep, allow_empty_attention=True)
    structure = layer_structure(pruned)
    assert structure["layers"][0]["skipped"] and structure["layers"][0]["heads"] == 0
    fresh = type(model)(model.config).eval()
    apply_layer_structure(fresh, structure)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert torch.allclose(_logits(fresh, x), _logits(pruned, x), atol=1e-6)


def test_layer_structure_keeps_biases_added_by_flap():
    from brainsurgeon.structured.transformer import apply_layer_structure, layer_structure

    model = tiny("llama")
    x = torch.randint(0, VOCAB, (4, 12))
    res = bs.prune(model, x, "flap", 0.3, structure="channel", allocation="global", measure_latency=False)
    structure = layer_structure(res.model)
    assert "model.layers.0.mlp.down_proj" in structure["biases"]
    fresh = type(model)(model.config).eval()
    apply_layer_structure(fresh, structure)
    fresh.load_state_dict(res.model.state_dict(), strict=True)
    assert torch.allclose(_logits(fresh, x), _logits(res.model, x), atol=1e-6)


def test_unknown_attention_layout_is_refused_by_name():
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=64)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with pytest.raises(bs.BrainsurgeonError, match="GPTNeoXForCausalLM"):
        bs.prune(model, torch.randint(0, VOCAB, (2, 8)), "magnitude", 0.2, structure="channel")


def test_inconsistent_head_group_is_refused_by_name():
    model = tiny("llama")
    model.model.layers[1].self_attn.q_proj = torch.nn.Linear(32, 30, bias=False)
    with pytest.raises(bs.BrainsurgeonError, match=r"model\.layers\.1\.self_attn\.q_proj.*cannot be pruned consistently"):
        bs.prune(model, torch.randint(0, VOCAB, (2, 8)), "magnitude", 0.2, structure="channel")


def test_report_counts_match_the_compact_model():
    model = tiny("llama")
    x = torch.randint(0, VOCAB, (4, 12))
    res = bs.prune(model, x, "fisher-mask", 0.3, structure="channel", allocation="global", measure_latency=False)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in res.model.parameters())
    assert res.report["overall"]["removed_params"] == before - after
    assert res.report["overall"]["achieved_sparsity"] >= 0.3
    for i, (name, r) in enumerate(res.report["layers"].items()):
        layer = res.model.model.layers[i]
        assert r["ffn_before"] == 40 and r["ffn_after"] == layer.mlp.down_proj.in_features
        assert r["heads_after"] * 8 == layer.self_attn.q_proj.out_features
