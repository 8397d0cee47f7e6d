"""Block-sequential calibration equals the layer-by-layer path (masks and weights, float64), in O(L) passes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.sequential import PATH_BLOCKS, PATH_LAYERS, find_blocks, plan_blocks
from brainsurgeon.targets import find_targets

from conftest import tiny_cnn, tiny_data

transformers = pytest.importorskip("transformers")
from test_hf_adapter import BUILDERS, tokens, tiny_llama  # noqa: E402


def deep_mlp(seed=0) -> nn.Module:
    """A 4-block nn.Sequential with nested layers, float64: 8 -> 16 -> 16 -> 12 -> 4."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)),
        nn.GELU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4),
    ).double().eval()


def both_paths(model, data, method, sparsity=0.5, **kw):
    blocks = bs.prune(model, data, method, sparsity, calibration_path="blocks", **kw)
    layers = bs.prune(model, data, method, sparsity, calibration_path="layers", **kw)
    assert blocks.report["calibration"]["path"] == PATH_BLOCKS
    assert layers.report["calibration"]["path"] == PATH_LAYERS
    return blocks, layers


def assert_same(a, b, tol=1e-10):
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=tol, msg=name)


OPTIONS = [{}, {"structure": "2:4"}, {"allocation": "global"}, {"error_correction": True}]
CASES = [(m, o) for m in ("sparsegpt", "wanda", "obc") for o in OPTIONS if not (m == "wanda" and "error_correction" in o)]


@pytest.mark.parametrize("method, options", CASES)  # wanda updates no weight: no error correction
def test_mlp_blocks_equal_layers(method, options):
    x, y = tiny_data((8,), n=40)
    model = deep_mlp()
    before = copy.deepcopy(model.state_dict())
    a, b = both_paths(model, (x.double(), y), method, **options)
    assert_same(a, b)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])
    # counts exact
    for name, mask in a.masks.items():
        rep = a.report["layers"][name]
        assert int((~mask).sum()) == round(rep["target_sparsity"] * mask.numel())


def test_cnn_blocks_equal_layers():
    x, y = tiny_data((1, 4, 4), n=24)
    a, b = both_paths(tiny_cnn().double().eval(), (x.double(), y), "sparsegpt", 0.5)
    assert_same(a, b)
    assert a.report["calibration"]["blocks"] == 6


def test_low_precision_activations_between_parameterless_blocks():
    x, y = tiny_data((8,), n=16)
    res = bs.prune(deep_mlp().float(), (x, y), "sparsegpt", 0.5, activations_dtype="bfloat16")
    assert res.report["calibration"]["activations_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_hf_blocks_equal_layers_float64(family, method):
    model = BUILDERS[family](dtype=torch.float64)
    a, b = both_paths(model, tokens(6, 10), method, batch_size=4)
    assert_same(a, b)
    assert a.report["calibration"]["blocks"] == 2
    assert a.report["overall"]["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_error_correction_and_nm_equal_layers(family):
    model = BUILDERS[family](dtype=torch.float64)
    data = tokens(4, 8)
    assert_same(*both_paths(model, data, "sparsegpt", error_correction=True, batch_size=2))
    assert_same(*both_paths(model, data, "sparsegpt", allocation="global", batch_size=2))  # dense pass, then pruning
    a, b = both_paths(model, data, "sparsegpt", structure="2:4", batch_size=2)
    assert_same(a, b)
    for name, mask in a.masks.items():  # N:M valid, in the module's own orientation (GPT-2 Conv1D: (in, out))
        m = mask.T if family == "gpt2" else mask
        assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_block_passes_grow_linearly():
    """O(L): the block passes per block are a constant (capture + groups + recompute)."""
    counts = {}
    for layers in (2, 4):
        model = tiny_llama(layers=layers)
        res = bs.prune(model, tokens(4, 8), "wanda", 0.5)
        counts[layers] = res.report["calibration"]["block_passes"]
    per_block = (counts[4] - counts[2]) / 2
    assert per_block == 1  # the 4 input groups (qkv, o, gate/up, down) are solved inside one lockstep pass
    assert counts[2] == 1 + 2 * per_block


def test_lockstep_pass_equals_partial_passes(monkeypatch):
    """One lockstep pass per block (each batch pausing at every group) is bit-identical to the
    partial pass per group plus the recompute it replaces."""
    import brainsurgeon.sequential as seq

    model = tiny_llama(layers=3)
    data = tokens(6, 8)
    for method in ("sparsegpt", "wanda"):
        one = bs.prune(model, data, method, 0.5, batch_size=2, lockstep=True)
        partial = bs.prune(model, data, method, 0.5, batch_size=2, lockstep=False)
        assert one.report["calibration"]["block_passes"] == 1 + 3
        assert one.report["calibration"]["lockstep_blocks"] == 3 and partial.report["calibration"]["lockstep_blocks"] == 0
        assert partial.report["calibration"]["block_passes"] == 1 + 3 * 5
        for n in one.masks:
            assert torch.equal(one.masks[n], partial.masks[n]), n
        for (n, p), (_, q) in zip(one.model.named_parameters(), partial.model.named_parameters()):
            assert torch.equal(p, q), n


def test_groups_share_one_accumulation_and_lm_head_runs_after_blocks():
    model = tiny_llama(dtype=torch.float64)
    res = bs.prune(model, tokens(4, 8), "sparsegpt", 0.5, layers=["*proj", "lm_head"], calibration_path="blocks")
    cal = res.report["calibration"]
    assert cal["layers_after_blocks"] == ["lm_head"]
    ref = bs.prune(model, tokens(4, 8), "sparsegpt", 0.5, layers=["*proj", "lm_head"], calibration_path="layers")
    assert_same(res, ref)
    # tied: lm_head and the input embedding are one parameter, pruned once
    assert torch.equal(res.model.lm_head.weight, res.model.model.embed_tokens.weight)
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight


def test_activations_dtype_bfloat16_close_to_float32():
    model = tiny_llama()
    data = tokens(6, 10)
    full = bs.prune(model, data, "sparsegpt", 0.5)
    half = bs.prune(model, data, "sparsegpt", 0.5, activations_dtype="bfloat16")
    assert half.report["calibration"]["activations_dtype"] == "bfloat16"
    agree = sum(int((full.masks[n] == half.masks[n]).sum()) for n in full.masks) / sum(m.numel() for m in full.masks.values())
    assert agree > 0.9  # bfloat16 activations (8-bit mantissa) move a few borderline weights only


def test_find_blocks_plain_modules():
    assert find_blocks(nn.Linear(2, 2)) is None
    assert [n for n, _ in find_blocks(deep_mlp())] == [str(i) for i in range(7)]
    model = deep_mlp()
    plan = plan_blocks(model, find_targets(model))
    assert [len(ts) for _, _, ts in plan.blocks] == [1, 0, 2, 0, 1, 0, 1] and plan.tail == []


class EncoderNet(nn.Module):
    """nn.TransformerEncoder (its layers found as blocks, chain checked on data) and a head after it."""

    def __init__(self, chain=True):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)
        self.chain = chain

    def forward(self, x):
        if self.chain:
            return self.head(self.enc(x).mean(1))
        h = self.enc.layers[0](x)
        return self.head(self.enc.layers[1](2.0 * h).mean(1))  # not a plain chain


def test_transformer_encoder_layers_as_blocks():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)
    model = EncoderNet().double().eval()
    a, b = both_paths(model, (x, y), "sparsegpt")
    assert_same(a, b)
    assert a.report["calibration"]["blocks"] == 2 and a.report["calibration"]["layers_after_blocks"] == ["head"]
    broken = EncoderNet(chain=False).double().eval()  # the chain check sends it down the exact old path
    with pytest.raises(BrainsurgeonError, match="no chain of blocks"):
        bs.prune(broken, (x, y), "wanda", 0.5, calibration_path="blocks")
    assert bs.prune(broken, (x, y), "wanda", 0.5).report["calibration"]["path"] == PATH_LAYERS


def test_blocks_path_refused_without_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x, y = tiny_data((8,), n=16)
    with pytest.raises(BrainsurgeonError, match="no chain of blocks"):
        bs.prune(Net(), (x, y), "sparsegpt", 0.5, calibration_path="blocks")
    res = bs.prune(Net(), (x, y), "sparsegpt", 0.5)
    assert res.report["calibration"]["path"] == PATH_LAYERS


def test_lockstep_auto_follows_the_memory_estimate(monkeypatch):
    import brainsurgeon.sequential as seq

    model, data = tiny_llama(layers=2), tokens(4, 8)
    auto = bs.prune(model, data, "sparsegpt", 0.5, batch_size=2)
    assert auto.report["calibration"]["lockstep_blocks"] == 2
    assert auto.report["calibration"]["lockstep"].startswith("auto: about")
    monkeypatch.setattr(seq, "LOCKSTEP_MEMORY_SHARE", 0.0)  # nothing fits: partial passes, said so
    small = bs.prune(model, data, "sparsegpt", 0.5, batch_size=2)
    assert small.report["calibration"]["lockstep_blocks"] == 0
    assert "over 0% of the" in small.report["calibration"]["lockstep"]
    for n in auto.masks:
        assert torch.equal(auto.masks[n], small.masks[n])
    with pytest.raises(bs.BrainsurgeonError, match="lockstep must be"):
        bs.prune(model, data, "sparsegpt", 0.5, lockstep="yes")


def _mask_agreement(a, b) -> float:
    return sum(int((a.masks[n] == b.masks[n]).sum()) for n in a.masks) / sum(m.numel() for m in a.masks.values())


def _weight_gap(a, b) -> float:
    wa = {n: a.model.get_submodule(n).weight.detach().double() for n in a.masks}
    wb = {n: b.model.get_submodule(n).weight.detach().double() for n in a.masks}
    return sum(float((wa[n] - wb[n]).norm()) for n in wa) / sum(float(wb[n].norm()) for n in wb)


def test_compute_dtype_runs_the_forwards_in_a_low_precision_shadow(monkeypatch):
    import brainsurgeon.sequential as seq

    model, data = tiny_llama(layers=3, hidden=64), tokens(16, 16)
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: seen.add(a[0].dtype) if isinstance(m, nn.Linear) and a and torch.is_tensor(a[0]) else None)
    try:
        fast = bs.prune(model, data, "sparsegpt", 0.5, compute_dtype="bfloat16", batch_size=4)
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # the block forwards ran in bfloat16
    assert all(p.dtype == torch.float32 for p in fast.model.parameters())  # the solves updated float32 weights
    assert fast.report["calibration"]["compute_dtype"] == "bfloat16"
    from brainsurgeon.curvature import gram_kernel  # X^T X of the bfloat16 rows: AMX where the CPU has it

    assert fast.report["calibration"]["gram"].startswith("amx" if gram_kernel.available() else "torch: bfloat16")
    ref = bs.prune(model, data, "sparsegpt", 0.5, batch_size=4)
    assert ref.report["calibration"]["gram"].startswith("torch: the rows' dtype")
    assert _mask_agreement(fast, ref) > 0.9 and _weight_gap(fast, ref) < 0.1
    # partial passes run the same shadow: bit-identical to the lockstep pass
    partial = bs.prune(model, data, "sparsegpt", 0.5, compute_dtype="bfloat16", batch_size=4, lockstep=False)
    assert_same(fast, partial, tol=0)
    # without copying each solved group into the shadow, later groups and blocks would see dense
    # weights: the result drifts much further from the float32 run
    monkeypatch.setattr(seq.Shadow, "sync", lambda self, group: None)
    stale = bs.prune(model, data, "sparsegpt", 0.5, compute_dtype="bfloat16", batch_size=4)
    assert _weight_gap(stale, ref) > 2 * _weight_gap(fast, ref)


def test_compute_dtype_needs_the_block_path():
    x, y = tiny_data((8,), n=16)
    with pytest.raises(BrainsurgeonError, match="compute_dtype='bfloat16'.*layer by layer"):
        bs.prune(deep_mlp(), (x.double(), y), "sparsegpt", 0.5, calibration_path="layers", compute_dtype="bfloat16")
    with pytest.raises(BrainsurgeonError, match="compute_dtype must be"):
        bs.prune(deep_mlp(), (x.double(), y), "sparsegpt", 0.5, compute_dtype="int8")
    res = bs.prune(deep_mlp(), (x.double(), y), "wanda", 0.5, compute_dtype="float32")  # an MLP's blocks: a float32 shadow
    assert res.report["calibration"]["compute_dtype"] == "float32"


def test_compute_dtype_with_error_correction_and_conv1d():
    from test_hf_adapter import tiny_gpt2

    model, data = tiny_llama(layers=2, hidden=32), tokens(8, 16)
    ec = bs.prune(model, data, "sparsegpt", 0.5, compute_dtype="bfloat16", error_correction=True, batch_size=4)
    ref = bs.prune(model, data, "sparsegpt", 0.5, error_correction=True, batch_size=4)
    assert ec.report["error_correction"] is True and ec.report["calibration"]["compute_dtype"] == "bfloat16"
    assert _mask_agreement(ec, ref) > 0.9 and _weight_gap(ec, ref) < 0.1
    gpt = bs.prune(tiny_gpt2(), data, "wanda", 0.5, compute_dtype="bfloat16", batch_size=4)
    assert type(gpt.model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # swapped back after the shadowed walk
    assert all(p.dtype == torch.float32 for p in gpt.model.parameters())
