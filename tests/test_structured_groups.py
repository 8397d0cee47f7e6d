"""Structured pruning core: dependency groups, compaction vs masking, allocation, report, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.models import ConcatNet, LeNet300, LeNet5, SmallMobileNet, SmallResNet, SmallVGG
from brainsurgeon.structured.groups import build_groups
from brainsurgeon.structured.latency import count_flops, count_params

from conftest import NUM_CLASSES, tiny_data

COMMON = dict(num_samples=32, batch_size=16, seed=0, structure="channel")

ARCHS = {
    "lenet300": (LeNet300, (1, 8, 8)),
    "lenet5": (LeNet5, (1, 16, 16)),  # 16x16: each conv2 channel flattens into 2x2 Linear inputs
    "vgg-bn": (SmallVGG, (1, 8, 8)),
    "resnet": (SmallResNet, (1, 8, 8)),
    "mobilenet": (SmallMobileNet, (1, 8, 8)),
    "concat": (ConcatNet, (1, 8, 8)),
}


def _model(arch: str) -> tuple[nn.Module, tuple]:
    cls, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = cls(shape, NUM_CLASSES)
    # non-trivial BN statistics, so masking/compaction must carry them correctly
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval(), shape


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compact_equals_masked_and_shrinks(arch):
    model, shape = _model(arch)
    x, y = tiny_data(shape, n=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bs.prune(model, (x, y), "l1-norm", 0.5, **COMMON)
    masked = bs.prune(model, (x, y), "l1-norm", 0.5, compact=False, **COMMON)
    with torch.no_grad():
        out_c, out_m = res.model(x), masked.model(x)
    assert out_c.shape == (32, NUM_CLASSES)  # the interface is unchanged
    torch.testing.assert_close(out_c, out_m, atol=1e-5, rtol=0)
    # the masked model keeps every shape; the compact one lost exactly the removed units
    assert count_params(masked.model) == count_params(model)
    assert count_params(res.model) < count_params(model)
    rep = res.report
    for name, g in rep["groups"].items():
        assert g["removed"] == round(0.5 * g["units_before"]) and g["units_after"] >= 1
    assert rep["cost"]["before"]["params"] == count_params(model)
    assert rep["cost"]["after"]["params"] == count_params(res.model)
    assert rep["cost"]["after"]["flops"] < rep["cost"]["before"]["flops"]
    for c in ("before", "after"):
        assert all(v > 0 for v in rep["cost"][c]["latency_ms"].values())
    assert any("model's outputs" in why for why in rep["fixed"].values())
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compact_mlp_matches_hand_sliced_network():
    """Brute force: slice W1 rows, b1 and W2 columns by hand and compare outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, NUM_CLASSES)).eval()
    x, y = tiny_data((8,), n=32)
    res = bs.prune(model, (x, y), "l1-norm", 0.25, **COMMON)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    keep = w1.abs().sum(1).argsort(descending=True)[:9].sort().values
    ref = torch.relu(x @ w1[keep].T + b1[keep]) @ w2[:, keep].T + b2
    torch.testing.assert_close(res.model(x), ref, atol=1e-6, rtol=0)
    assert res.masks["0"].sum() == 9 and res.model[0].weight.shape == (9, 8)


def test_groups_couple_residual_partners_and_concat_offsets():
    model, shape = _model("resnet")
    groups = build_groups(model, torch.zeros(2, *shape))
    proj = [g for g in groups if "layers.1.conv2" in g.layer_names][0]
    assert {m.name for m in proj.producers} == {"layers.1.conv2", "layers.1.shortcut.0"}
    assert {m.name for m in proj.norms} == {"layers.1.bn2", "layers.1.shortcut.1"}
    assert {m.name for m in proj.consumers} == {"layers.2.conv1", "layers.2.shortcut.0"}
    identity = [g for g in groups if "stem.0" in g.layer_names][0]  # stem + block 0 (identity shortcut)
    assert {m.name for m in identity.producers} == {"stem.0", "layers.0.conv2"}

    model, shape = _model("concat")
    groups = build_groups(model, torch.zeros(2, *shape))
    b3 = groups["branch3"]
    bn = [m for m in b3.members if m.name == "bn"][0]
    conv_in = [m for m in b3.members if m.name == "conv"][0]
    assert bn.positions.tolist() == list(range(8, 24)) == conv_in.positions.tolist()

    model, shape = _model("mobilenet")
    groups = build_groups(model, torch.zeros(2, *shape))
    assert [m.name for m in groups["stem.0"].by_role("depthwise")] == ["blocks.0"]


def test_flatten_maps_each_channel_to_its_linear_inputs():
    model, shape = _model("lenet5")
    group = build_groups(model, torch.zeros(2, *shape))["features.3"]
    fc = group.consumers[0]
    assert fc.name == "classifier.1" and fc.positions.numel() == 16 * 4
    assert fc.positions.view(16, 4)[3].tolist() == [12, 13, 14, 15]  # channel 3 -> its 2x2 block


def test_global_allocation_is_exact_and_scale_invariant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, NUM_CLASSES)).eval()
    x, y = tiny_data((8,), n=32)
    res = bs.prune(model, (x, y), "l2-norm", 0.4, allocation="global", **COMMON)
    removed = sum(g["removed"] for g in res.report["groups"].values())
    assert removed == round(0.4 * 22) and res.report["overall"]["removed_units"] == removed
    # per-layer L2 normalization: rescaling one layer's weights (ReLU is positively homogeneous,
    # the next layer undoes it) changes neither the function nor the allocation
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(50), scaled[0].bias.mul_(50), scaled[2].weight.div_(50)
    res2 = bs.prune(scaled, (x, y), "l2-norm", 0.4, allocation="global", **COMMON)
    assert {k: v["removed"] for k, v in res.report["groups"].items()} == {
        k: v["removed"] for k, v in res2.report["groups"].items()
    }


def test_cap_keeps_one_unit_and_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 2), nn.ReLU(), nn.Linear(2, NUM_CLASSES)).eval()
    x, y = tiny_data((8,), n=32)
    res = bs.prune(model, (x, y), "l1-norm", 0.9, **COMMON)
    assert res.report["groups"]["2"]["units_after"] == 1  # round(0.9 * 2) = 2 would empty it
    assert "2" in res.report["capped"] and "0" not in res.report["capped"]
    assert any("cap" in n for n in res.report["notes"])
    res = bs.prune(model, (x, y), "l1-norm", 0.5, allocation="global", max_layer_sparsity=0.5, **COMMON)
    assert all(g["removed"] <= g["units_before"] // 2 for g in res.report["groups"].values())


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def test_unsupported_layers_are_named():
    x, y = tiny_data((8,), n=16)
    with pytest.raises(bs.BrainsurgeonError, match="'ln'.*LayerNorm"):
        bs.prune(_WithLayerNorm(), (x, y), "l1-norm", 0.5, **COMMON)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(NUM_CLASSES))
    xi, yi = tiny_data((1, 8, 8), n=16)
    grouped(xi)  # materialize the lazy layer
    with pytest.raises(bs.BrainsurgeonError, match="grouped convolution '1'"):
        bs.prune(grouped, (xi, yi), "l1-norm", 0.5, **COMMON)


def test_partly_selected_residual_group_is_refused_with_its_layers():
    model, shape = _model("resnet")
    x, y = tiny_data(shape, n=16)
    with pytest.raises(bs.BrainsurgeonError, match=r"layers\.1\.conv2.*layers\.1\.shortcut\.0|coupled"):
        bs.prune(model, (x, y), "l1-norm", 0.5, layers=["layers.1.conv2"], **COMMON)
    # selecting a layer prunes only its group
    res = bs.prune(model, (x, y), "l1-norm", 0.5, layers=["layers.0.conv1"], **COMMON)
    assert list(res.report["groups"]) == ["layers.0.conv1"]


def test_method_structure_mismatches_are_refused():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, NUM_CLASSES))
    x, y = tiny_data((8,), n=16)
    with pytest.raises(bs.BrainsurgeonError, match="structured method.*l1-norm"):
        bs.prune(model, (x, y), "magnitude", 0.5, **COMMON)
    with pytest.raises(bs.BrainsurgeonError, match="structure='channel'"):
        bs.prune(model, (x, y), "l1-norm", 0.5, num_samples=16)
    with pytest.raises(bs.BrainsurgeonError, match="compact"):
        bs.prune(model, (x, y), "magnitude", 0.5, compact=False)
    with pytest.raises(bs.BrainsurgeonError, match="allocation"):
        bs.prune(model, (x, y), "l1-norm", 0.5, allocation="sensitivity", **COMMON)
    with pytest.raises(bs.BrainsurgeonError, match="compact must be"):
        bs.prune(model, (x, y), "l1-norm", 0.5, compact="yes", **COMMON)


def test_flops_counter_counts_multiply_adds_twice():
    layer = nn.Linear(8, 5)
    assert count_flops(layer, torch.zeros(1, 8)) == 2 * 8 * 5
