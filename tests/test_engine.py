"""``bs.prune`` end to end: the generic contract every registered method must keep, and bad input.

The generic tests are parametrized over ``bs.methods()`` at collection time, so every method that
another module registers is held to the same contract (exact sparsity, zeros, determinism, the
user's model untouched, data forms equivalent, N:M validity).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brainsurgeon as bs
from brainsurgeon import registry
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.pruners.base import SaliencyMethod
from brainsurgeon.targets import find_targets

from conftest import all_methods, nm_methods, non_nm_methods, tiny_data

METHODS = all_methods()
BATCH = 16  # several calibration batches even on the tiny data
COMMON = dict(num_samples=48, batch_size=BATCH, seed=0)


def _prune(model, data, method, sparsity=0.5, **kw):
    return bs.prune(model, data, method, sparsity, **{**COMMON, **kw})


def _pruned_counts(res) -> dict[str, int]:
    return {name: int((~m).sum()) for name, m in res.masks.items()}


def _assert_masks_applied(res) -> None:
    """Pruned weights are exactly zero and every weight is finite."""
    for t in find_targets(res.model):
        mask = res.masks[t.name]
        w = t.weight.detach().cpu()
        assert mask.dtype == torch.bool and mask.shape == w.shape, t.name
        assert torch.all(w[~mask] == 0), f"{t.name}: pruned weights are not exactly zero"
        assert torch.isfinite(w).all(), t.name


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- registry


def test_methods_lists_registered_methods_with_summaries():
    listed = bs.methods()
    assert {"magnitude", "random"} <= set(listed)
    assert list(listed) == sorted(listed)
    for name, summary in listed.items():
        cls = registry.get_method(name)
        assert cls.name == name
        assert summary == cls.summary and summary.strip() and "\n" not in summary
        assert (cls.__doc__ or "").strip(), f"{name} has no docstring"


def test_register_refuses_duplicates_and_missing_summary():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("magnitude")(type("Dup", (SaliencyMethod,), {"summary": "x", "__doc__": "x"}))
    with pytest.raises(ValueError, match="summary"):
        registry.register("no-summary-test")(type("NoSummary", (SaliencyMethod,), {"__doc__": "x"}))
    assert "no-summary-test" not in bs.methods()


# ----------------------------------------------------------------------------- generic contract


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_uniform_exact_sparsity_per_layer_and_model_untouched(method, sparsity, mlp_case):
    model, data = mlp_case
    before = _state(model)
    res = _prune(model, data, method, sparsity)
    _assert_same_state(before, _state(model))
    assert res.model is not model
    for t in find_targets(res.model):
        k = round(sparsity * t.weight.numel())
        assert _pruned_counts(res)[t.name] == k, t.name
        assert int((t.weight == 0).sum()) >= k
        rep = res.report["layers"][t.name]
        # the nominal target, or the nearest achievable count of it (k / n)
        assert abs(rep["target_sparsity"] - sparsity) <= 0.5 / t.weight.numel() + 1e-12
        assert rep["pruned"] == k
    _assert_masks_applied(res)
    assert res.report["method"] == method
    assert res.report["options"]["num_samples"] == 48


@pytest.mark.parametrize("method", METHODS)
def test_uniform_on_convolutions(method, cnn_case):
    model, data = cnn_case
    before = _state(model)
    res = _prune(model, data, method, 0.7)
    _assert_same_state(before, _state(model))
    for t in find_targets(res.model):
        assert _pruned_counts(res)[t.name] == round(0.7 * t.weight.numel()), t.name
    _assert_masks_applied(res)


@pytest.mark.parametrize("method", METHODS)
def test_global_exact_overall_sparsity_with_cap(method, mlp_case):
    model, data = mlp_case
    cap = 0.75
    res = _prune(model, data, method, 0.6, allocation="global", max_layer_sparsity=cap)
    sizes = {t.name: t.weight.numel() for t in find_targets(res.model)}
    counts = _pruned_counts(res)
    assert sum(counts.values()) == round(0.6 * sum(sizes.values()))
    for name, n in sizes.items():
        assert counts[name] <= math.floor(cap * n), f"{name} exceeds the cap"
    assert res.report["overall"]["achieved_sparsity"] == pytest.approx(sum(counts.values()) / sum(sizes.values()))
    _assert_masks_applied(res)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(method, mlp_case):
    model, data = mlp_case
    a = _prune(model, data, method, 0.5, seed=3)
    b = _prune(model, data, method, 0.5, seed=3)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    _assert_same_state(_state(a.model), _state(b.model))


@pytest.mark.parametrize("method", METHODS)
def test_tuple_dataloader_and_batch_list_give_the_same_result(method, mlp_case):
    model, (x, y) = mlp_case
    from_tuple = _prune(model, (x, y), method)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    from_loader = _prune(model, loader, method)
    from_numpy = _prune(model, (x.numpy(), y.numpy()), method)
    for other in (from_loader, from_numpy):
        for name in from_tuple.masks:
            assert torch.equal(from_tuple.masks[name], other.masks[name]), name
        _assert_same_state(_state(from_tuple.model), _state(other.model))


@pytest.mark.parametrize("method", nm_methods())
def test_nm_masks_are_valid(method, mlp_case):
    model, data = mlp_case
    res = _prune(model, data, method, None, structure="2:4")
    for t in find_targets(res.model):
        groups = res.masks[t.name].reshape(t.weight.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2), f"{t.name}: not 2 kept in every group of 4"
        nonzero = (t.weight.detach().reshape(t.weight.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(nonzero <= 2), t.name
    assert res.report["overall"]["achieved_sparsity"] == pytest.approx(0.5)
    _assert_masks_applied(res)


def test_global_rng_state_is_not_advanced(mlp_case):
    model, data = mlp_case
    state = torch.get_rng_state()
    _prune(model, data, "random")
    assert torch.equal(state, torch.get_rng_state())


def test_random_depends_on_seed(mlp_case):
    model, data = mlp_case
    a = _prune(model, data, "random", seed=1).masks
    b = _prune(model, data, "random", seed=2).masks
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_magnitude_prunes_the_smallest_weights(mlp_case):
    model, data = mlp_case
    res = _prune(model, data, "magnitude", 0.5)
    for t in find_targets(model):
        w = t.weight.detach().abs()
        mask = res.masks[t.name]
        assert w[~mask].max() <= w[mask].min(), t.name


def test_global_cap_binds_on_a_layer_with_tiny_weights(mlp_case):
    model, data = mlp_case
    small = copy.deepcopy(model)
    with torch.no_grad():
        small[2].weight.mul_(1e-4)  # magnitude would empty this layer first
    cap = 0.8
    res = _prune(small, data, "magnitude", 0.5, allocation="global", max_layer_sparsity=cap)
    n = small[2].weight.numel()
    assert _pruned_counts(res)["2"] == math.floor(cap * n)
    assert res.report["layers"]["2"]["achieved_sparsity"] == pytest.approx(math.floor(cap * n) / n)


def test_layers_patterns_select_the_targets(mlp_case):
    model, data = mlp_case
    res = _prune(model, data, "magnitude", 0.5, layers={"include": ["*"], "exclude": ["2"]})
    assert set(res.masks) == {"0", "4"}
    assert torch.equal(res.model[2].weight, model[2].weight)
    only = _prune(model, data, "magnitude", 0.5, layers=["0"])
    assert set(only.masks) == {"0"}


def test_model_mode_is_kept(mlp_case):
    model, data = mlp_case
    m = copy.deepcopy(model).train()
    res = _prune(m, data, "magnitude")
    assert m.training and res.model.training


# ----------------------------------------------------------------------------- bad input


class CountingData:
    """An iterable of batches that records whether anyone started reading it."""

    def __init__(self, data):
        self.x, self.y = data
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        for i in range(0, len(self.x), BATCH):
            yield self.x[i : i + BATCH], self.y[i : i + BATCH]


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _refused(model, data, method="magnitude", sparsity=0.5, match=None, **kw):
    """Assert a BrainsurgeonError (a ValueError) naming the problem, raised before the data is read."""
    counting = CountingData(data)
    with pytest.raises(BrainsurgeonError, match=match) as info:
        bs.prune(model, counting, method, sparsity, **kw)
    assert isinstance(info.value, ValueError)
    assert counting.reads == 0, "the error came after reading the data"
    return str(info.value)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_sparsity_outside_unit_interval_is_refused(sparsity, mlp_case):
    model, data = mlp_case
    _refused(model, data, sparsity=sparsity, match="sparsity")


def test_unknown_method_lists_registered_ones(mlp_case):
    model, data = mlp_case
    msg = _refused(model, data, method="obd-typo", match="unknown method")
    for name in bs.methods():
        assert name in msg


def _dense_only_method():
    class DenseOnly(SaliencyMethod):
        """A test-only method that cannot produce N:M patterns."""

        name = "test-dense-only"
        summary = "test only"
        supports_nm = False

        def scores(self, ctx):
            return {t.name: t.weight.abs() for t in ctx.targets}

    return DenseOnly


def test_nm_for_a_method_that_cannot_is_refused(mlp_case, monkeypatch):
    model, data = mlp_case
    monkeypatch.setitem(registry._REGISTRY, "test-dense-only", _dense_only_method())
    msg = _refused(model, data, method="test-dense-only", sparsity=None, structure="2:4", match="N:M")
    assert "magnitude" in msg  # names the methods that can


@pytest.mark.parametrize("method", non_nm_methods())
def test_nm_refused_for_registered_dense_only_methods(method, mlp_case):
    model, data = mlp_case
    _refused(model, data, method=method, sparsity=None, structure="2:4", match="N:M")


@pytest.mark.parametrize(
    "structure, sparsity, match",
    [("2:4", 0.7, "fixes the sparsity"), ("2:4", "half", "sparsity must be a number"), ("4:2", None, "0 < N < M"), ("blocks", 0.5, "unknown structure")],
)
def test_bad_structure_is_refused(structure, sparsity, match, mlp_case):
    model, data = mlp_case
    _refused(model, data, sparsity=sparsity, structure=structure, match=match)


def test_model_without_prunable_layers_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    _refused(model, tiny_data(), match="no prunable layers")


def test_not_a_module_is_refused(mlp_case):
    _, data = mlp_case
    _refused(lambda x: x, data, match="nn.Module")


@pytest.mark.parametrize("empty", ["tuple", "list"])
def test_empty_data_is_refused(empty, mlp_case):
    model, _ = mlp_case
    data = (torch.empty(0, 8), torch.empty(0, dtype=torch.long)) if empty == "tuple" else []
    with pytest.raises(BrainsurgeonError, match="empty"):
        bs.prune(model, data, "magnitude", 0.5)


def test_single_tensor_data_is_refused(mlp_case):
    model, (x, _) = mlp_case
    with pytest.raises(BrainsurgeonError, match=r"\(inputs, targets\)"):
        bs.prune(model, x, "magnitude", 0.5)


def test_data_that_does_not_fit_the_model_is_refused(mlp_case):
    model, _ = mlp_case
    counting = CountingModel(model)
    wrong = tiny_data((7,))
    with pytest.raises(BrainsurgeonError, match=r"does not fit the model.*\(16, 7\)"):
        bs.prune(counting, wrong, "magnitude", 0.5, batch_size=16)
    assert counting.calls == 0  # the check ran on the working copy, once, not on the user's model


def test_targets_that_do_not_fit_the_loss_are_refused(mlp_case):
    model, (x, y) = mlp_case
    with pytest.raises(BrainsurgeonError, match="loss cannot be computed"):
        bs.prune(model, (x, y + 10), "magnitude", 0.5)
    with pytest.raises(BrainsurgeonError, match="differ in length"):
        bs.prune(model, (x, y[:-1]), "magnitude", 0.5)


def test_nan_loss_is_refused(mlp_case):
    model, (x, y) = mlp_case
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(BrainsurgeonError, match="NaN"):
        bs.prune(model, (bad, y), "magnitude", 0.5)
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model[0].weight[0, 0] = float("nan")
    with pytest.raises(BrainsurgeonError, match="NaN"):
        bs.prune(nan_model, (x, y), "magnitude", 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_method_options_are_refused(method, mlp_case):
    model, data = mlp_case
    _refused(model, data, method=method, not_an_option=1, match=r"not_an_option.*options are")


@pytest.mark.parametrize("layers", ["conv*", ["nothing", "also_nothing"], {"include": ["0"], "exclude": ["0"]}])
def test_layer_patterns_matching_nothing_are_refused(layers, mlp_case):
    model, data = mlp_case
    msg = _refused(model, data, layers=layers, match="no prunable layer matches")
    assert "0, 2, 4" in msg  # lists the model's layers


def test_bad_layer_spec_is_refused(mlp_case):
    model, data = mlp_case
    _refused(model, data, layers={"only": ["0"]}, match="unknown keys")


def test_global_cap_below_sparsity_is_refused(mlp_case):
    model, data = mlp_case
    _refused(model, data, sparsity=0.8, allocation="global", max_layer_sparsity=0.5, match="raise the cap")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(allocation="per-layer"), "allocation"),
        (dict(max_layer_sparsity=1.0), "max_layer_sparsity"),
        (dict(num_samples=0), "num_samples"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(seed=1.5), "seed"),
        (dict(device="tpu-of-dreams"), "device"),
        (dict(loss_fn="mse"), "loss_fn"),
    ],
)
def test_bad_common_options_are_refused(kw, match, mlp_case):
    model, data = mlp_case
    _refused(model, data, match=match, **kw)


def test_nm_on_layers_of_the_wrong_width_is_refused_up_front():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    msg = _refused(model, tiny_data((6,)), sparsity=None, structure="2:4", match="multiple of 4")
    assert "0 (6 inputs)" in msg and "exclude" in msg
    res = bs.prune(model, tiny_data((6,)), "magnitude", structure="2:4", layers={"exclude": ["0"]})
    assert set(res.masks) == {"2"}


def test_missing_sparsity_says_how_to_fix(mlp_case):
    model, data = mlp_case
    assert "e.g. sparsity=0.9" in _refused(model, data, sparsity=None)
