"""``bs.prune_sweep``: several sparsities from one set of statistics, each result equal to ``bs.prune``'s."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.structured import transformer_engine  # noqa: E402

VOCAB = 61
KW = dict(structure="channel", allocation="global", measure_latency=False, batch_size=3)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _same(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("method", ["obd", "kfac-obs", "fisher-mask", "flap", "reconstruction"])
def test_each_result_equals_prune_at_that_sparsity(method, monkeypatch):
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    real = transformer_engine._checked_scores
    monkeypatch.setattr(transformer_engine, "_checked_scores", lambda *a: calls.append(1) or real(*a))
    swept = list(bs.prune_sweep(model, x, method, [0.3, 0.1, 0.2], **KW))
    assert len(calls) == 1  # the statistics once for three budgets
    for i, s in enumerate([0.3, 0.1, 0.2]):
        single = bs.prune(model, x, method, s, **KW)
        _same(swept[i], single)  # the compensation of one budget leaks into no other
        assert swept[i].report["sweep"]["index"] == i and swept[i].report["sweep"]["shared"] == ["statistics"]
        assert swept[i].report["overall"]["achieved_sparsity"] >= s - 1e-9
        assert swept[i].report["numerics"] == single.report["numerics"]
    assert len(calls) == 4
    removed = [r.report["overall"]["removed_params"] for r in swept]
    assert removed[1] < removed[2] < removed[0]


def test_user_model_untouched_and_results_independent():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(1))
    a, b = bs.prune_sweep(model, x, "kfac-obs", [0.2, 0.4], **KW)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert a.model is not b.model and a.model is not model
    pa = {id(p) for p in a.model.parameters()}
    assert not pa & {id(p) for p in b.model.parameters()}


def test_everything_is_checked_before_the_work(monkeypatch):
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (6, 12))
    monkeypatch.setattr(transformer_engine, "_checked_scores", lambda *a: pytest.fail("statistics ran"))
    with pytest.raises(bs.BrainsurgeonError, match="sparsities must be"):
        bs.prune_sweep(model, x, "obd", [0.2, 1.5], **KW)
    with pytest.raises(bs.BrainsurgeonError, match="sparsities must be"):
        bs.prune_sweep(model, x, "obd", [], **KW)
    with pytest.raises(bs.BrainsurgeonError, match="sparsities must be"):
        bs.prune_sweep(model, x, "obd", 0.2, **KW)
    with pytest.raises(bs.BrainsurgeonError, match="not sparsity="):
        bs.prune_sweep(model, x, "obd", [0.2], sparsity=0.2, **KW)
    with pytest.raises(bs.BrainsurgeonError, match="leave flops_target out"):
        bs.prune_sweep(model, x, "obd", [0.2], flops_target=0.5, **KW)
    with pytest.raises(bs.BrainsurgeonError, match="per-layer caps allow"):  # the last budget unreachable
        bs.prune_sweep(model, x, "obd", [0.2, 0.9], max_layer_sparsity=0.5, **KW)
    with pytest.raises(bs.BrainsurgeonError, match="token ids"):  # the data, before the statistics
        bs.prune_sweep(model, torch.full((6, 12), VOCAB + 5), "obd", [0.2], **KW)


def test_other_paths_prune_once_per_sparsity():
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
    swept = list(bs.prune_sweep(model, x, "wanda", [0.3, 0.6], batch_size=2))
    for res, s in zip(swept, [0.3, 0.6]):
        single = bs.prune(model, x, "wanda", s, batch_size=2)
        _same(res, single)
        assert res.report["sweep"]["shared"] == [] and "one bs.prune per sparsity" in res.report["sweep"]["why"]


def test_each_budget_starts_from_the_random_state_of_a_single_call(monkeypatch):
    from brainsurgeon.structured.heads import HeadMagnitude

    def noisy(self, tctx, keep):  # a compensation that draws random numbers
        with torch.no_grad():
            for p in tctx.model.parameters():
                p.add_(1e-3 * torch.rand(p.shape))

    monkeypatch.setattr(HeadMagnitude, "compensate", noisy)
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(1))
    swept = list(bs.prune_sweep(model, x, "magnitude", [0.2, 0.3], **KW))
    for res, s in zip(swept, [0.2, 0.3]):
        _same(res, bs.prune(model, x, "magnitude", s, **KW))
