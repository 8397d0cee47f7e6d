"""Layer-wise methods on HF models: save_pretrained round trip, OWL allocation, OBC's time budget, bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError

transformers = pytest.importorskip("transformers")
from test_hf_adapter import CTX, VOCAB, tiny_gpt2, tiny_llama, tiny_opt, tokens  # noqa: E402


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_pretrained_roundtrip_plain_transformers(make, tmp_path):
    model = make()
    before = copy.deepcopy(model.state_dict())
    res = bs.prune(model, tokens(6, 10), "sparsegpt", 0.5)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    pruned = res.model
    if make is tiny_gpt2:  # Conv1D back in place, masks in its (in, out) orientation
        conv = pruned.transformer.h[0].attn.c_attn
        assert type(conv).__name__ == "Conv1D"
        assert res.masks["transformer.h.0.attn.c_attn"].shape == conv.weight.shape == (32, 96)
        assert torch.equal(conv.weight == 0, ~res.masks["transformer.h.0.attn.c_attn"])
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(3, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pruned(x).logits, rtol=0, atol=0)
    zeros = sum(int((~m).sum()) for m in res.masks.values())
    assert zeros == res.report["overall"]["zeros"]


def _dense_input_norms(model, names, data):
    """|X_j|^2 of every named layer's input over the data, by plain forward hooks (no brainsurgeon)."""
    sq = {}
    mods = dict(model.named_modules())

    def hook(name):
        def f(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + x.square().sum(0)
        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    return sq


def test_owl_allocation_matches_direct_computation_and_counts_are_exact():
    model = tiny_llama(layers=4, dtype=torch.float64)
    data = tokens(8, 12)
    s, m, lam = 0.6, 3.0, 0.1
    res = bs.prune(model, data, "wanda", s, allocation="owl", owl_m=m, owl_lambda=lam, batch_size=4)
    owl = res.report["owl"]
    names = list(res.masks)
    sq = _dense_input_norms(model, names, data)
    mods = dict(model.named_modules())
    ratios = {}
    for b in range(4):
        block = [n for n in names if n.startswith(f"model.layers.{b}.")]
        metric = torch.cat([(mods[n].weight.abs() * sq[n].sqrt()).flatten() for n in block])
        ratios[f"model.layers.{b}"] = float((metric > m * metric.mean()).double().mean())
    for b, r in ratios.items():
        assert owl["outlier_ratio"][b] == pytest.approx(r, abs=1e-12)
    d = torch.tensor(list(ratios.values()), dtype=torch.float64)
    norm = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    expect = {b: s - float(v) for b, v in zip(ratios, norm - norm.mean())}
    for b, v in expect.items():
        assert owl["block_sparsity"][b] == pytest.approx(v, abs=1e-12)
    assert max(expect.values()) - min(expect.values()) == pytest.approx(2 * lam)
    total = sum(mk.numel() for mk in res.masks.values())
    zeros = sum(int((~mk).sum()) for mk in res.masks.values())
    assert zeros == round(s * total)  # exact in counts
    for n, mk in res.masks.items():  # each layer within one weight of its block's sparsity
        b = n.split(".self_attn")[0].split(".mlp")[0]
        assert abs(int((~mk).sum()) - expect[b] * mk.numel()) <= 1.0


def test_owl_refused_for_saliency_methods_and_nm():
    with pytest.raises(BrainsurgeonError, match="allocation='owl' needs a layer-wise method"):
        bs.prune(tiny_llama(), tokens(4, 8), "magnitude", 0.5, allocation="owl")
    with pytest.raises(BrainsurgeonError, match="owl_m and owl_lambda apply to allocation='owl'"):
        bs.prune(tiny_llama(), tokens(4, 8), "wanda", 0.5, owl_m=4)


def test_obc_states_its_time_budget_and_refuses():
    with pytest.raises(BrainsurgeonError, match=r"obc would take about .* s here .* use sparsegpt or wanda") as e:
        bs.prune(tiny_llama(), tokens(4, 8), "obc", 0.5, time_budget_s=1e-3)
    assert "\n" not in str(e.value)
    res = bs.prune(tiny_opt(), tokens(4, 8), "obc", 0.5)
    assert 0 < res.report["obc_time_estimate_s"] < 3600
    assert res.report["calibration"]["path"] == "block-sequential"


def test_padding_batches_end_to_end():
    ids = tokens(4, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    res = bs.prune(tiny_llama(), [{"input_ids": ids, "attention_mask": mask}], "sparsegpt", 0.5)
    assert res.report["overall"]["achieved_sparsity"] == 0.5


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (torch.full((2, 8), VOCAB + 3), {}, "vocabulary has 64 entries"),
        (torch.zeros(2, CTX + 4, dtype=torch.long), {}, "exceed the model's context of 32"),
        (None, {"layers": ["nothing*"]}, "no prunable layer matches"),
        (None, {"structure": "2:5"}, r"multiple of 5.*model\.layers\.0\.self_attn\.q_proj"),
        (None, {"device": "cuda:0"}, "the model is on cpu but device='cuda:0'"),
    ],
)
def test_bad_input_one_line_before_work(data, kwargs, message):
    data = tokens(4, 8) if data is None else data
    with pytest.raises(BrainsurgeonError, match=message) as e:
        bs.prune(tiny_llama(), data, "sparsegpt", kwargs.pop("sparsity", 0.5) if "structure" not in kwargs else None, **kwargs)
    assert "\n" not in str(e.value)


def test_exact_counts_sum_and_caps():
    from brainsurgeon.pruners.layerwise import exact_counts

    numels = {"a": 100, "b": 37, "c": 1000}
    fr = {"a": 0.95, "b": 0.2, "c": 0.55}
    k = 600
    counts = exact_counts(fr, numels, k, 0.9)
    assert sum(counts.values()) == k
    assert counts["a"] <= 90  # held at the cap, the shift spread over the others
    assert all(0 <= c <= 0.9 * numels[n] for n, c in counts.items())
    with pytest.raises(BrainsurgeonError, match="raise the cap"):
        exact_counts(fr, numels, 1100, 0.9)


@pytest.mark.parametrize("path", ["blocks", "layers"])
def test_owl_on_plain_sequential_exact(path):
    from conftest import tiny_data
    from test_sequential import deep_mlp

    x, y = tiny_data((8,), n=32)
    res = bs.prune(deep_mlp(), (x.double(), y), "sparsegpt", 0.7, allocation="owl", calibration_path=path)
    total = sum(m.numel() for m in res.masks.values())
    assert sum(int((~m).sum()) for m in res.masks.values()) == round(0.7 * total)
    spars = res.report["owl"]["block_sparsity"]
    assert len(spars) == (4 if path == "blocks" else 5)  # the nested Sequential is one block


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "obd"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_result_owns_its_embeddings_ties_kept_user_untouched(method, make):
    """Layer-wise methods let the working copy read the user's embedding tables during the run
    (engine.untouched_embeddings); the result must still own them, tied to its lm_head."""
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bs.prune(model, tokens(4, 8), method, 0.5)
    emb_user, emb_res = model.get_input_embeddings().weight, res.model.get_input_embeddings().weight
    assert emb_res.data_ptr() != emb_user.data_ptr()
    assert res.model.get_output_embeddings().weight is emb_res
    with torch.no_grad():
        emb_res.add_(1.0)  # the result's tables are its own: the user's model does not see this
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert emb_user.grad is None


def test_targeted_tied_lm_head_is_pruned_in_the_copy_only():
    model = tiny_llama()
    before = model.lm_head.weight.clone()
    res = bs.prune(model, tokens(4, 8), "sparsegpt", 0.5, layers=["*proj", "lm_head"])
    assert torch.equal(model.lm_head.weight, before)
    w = res.model.lm_head.weight
    assert w is res.model.model.embed_tokens.weight and float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_untouched_embeddings_shared_only_by_methods_that_write_only_targets():
    from brainsurgeon.engine import untouched_embeddings
    from brainsurgeon.registry import get_method
    from brainsurgeon.targets import find_targets

    model = tiny_llama()
    shared = untouched_embeddings(model, find_targets(model, ["*proj"]))
    assert [p is model.model.embed_tokens.weight for p in shared] == [True]
    assert untouched_embeddings(model, find_targets(model, ["*proj", "lm_head"])) == []
    assert get_method("sparsegpt").writes_only_targets and get_method("wanda").writes_only_targets
    assert not get_method("obd").writes_only_targets and not get_method("kfac-obs").writes_only_targets
