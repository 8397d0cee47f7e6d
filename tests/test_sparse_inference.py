"""Sparse modules give the dense layers' outputs; to_sparse chooses per layer and leaves its input alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.models import LeNet5, build_model, make_spec
from brainsurgeon.sparse import SparseConv2d, SparseLinear
from brainsurgeon.sparse.kernels import CSR, ENGINES, SPARSE_ENGINES, available_engines, get_engine

RTOL = 1e-5


def prune_(module: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.mul_(torch.rand(module.weight.shape, generator=g) >= sparsity)
    return module


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((y - ref).abs().max() <= RTOL * ref.abs().max())


USABLE = [e for e, why in available_engines().items() if why is None]  # to_sparse's defaults
ALL_ENGINES = tuple(e for e in ENGINES if e != "dense")
ALL_USABLE = [e for e, why in available_engines(ALL_ENGINES).items() if why is None]


def test_numba_and_torch_engines_are_usable():
    # our own kernels and torch's must always work; MKL depends on the runtime being installed
    assert {"bitmask", "bitmask_serial", "numba_csr", "numba_csr_serial", "torch_csr", "torch_bsr"} <= set(ALL_USABLE)
    assert "numba_csr" not in SPARSE_ENGINES  # a second OpenMP runtime: opt-in only (kernels.SPARSE_ENGINES)


@pytest.mark.parametrize("engine", ALL_ENGINES)
@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_linear_matches_dense(engine, batch):
    if engine not in ALL_USABLE:  # not a skip: an unusable engine must be refused clearly
        with pytest.raises(BrainsurgeonError, match="not usable"):
            bs.to_sparse(nn.Linear(8, 8), engine=engine)
        return
    torch.manual_seed(0)
    layer = prune_(nn.Linear(96, 40), 0.9)
    sparse = SparseLinear(layer, engine)
    x = torch.randn(batch, 96)
    assert close(sparse(x), layer(x))
    x3 = torch.randn(2, batch, 96)  # leading dimensions are kept
    assert sparse(x3).shape == (2, batch, 40) and close(sparse(x3), layer(x3))


def test_numba_wide_layer_uses_int32_indices_and_matches():
    torch.manual_seed(0)
    layer = prune_(nn.Linear(70_000, 3), 0.99)
    sparse = SparseLinear(layer, "numba_csr")
    assert sparse._states["numba_csr"].indices.dtype.name == "int32"
    assert SparseLinear(prune_(nn.Linear(784, 3), 0.9), "numba_csr")._states["numba_csr"].indices.dtype.name == "uint16"
    for batch in (1, 4):
        x = torch.randn(batch, 70_000)
        assert close(sparse(x), layer(x))


CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=2, bias=False),
    dict(in_channels=2, out_channels=5, kernel_size=(3, 2), dilation=2, padding=(1, 0)),
    dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own note on the dense reference
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("engine", ["numba_csr", "torch_csr"])
def test_sparse_conv_matches_dense(cfg, batch, engine):
    torch.manual_seed(1)
    conv = prune_(nn.Conv2d(**cfg), 0.8)
    sparse = SparseConv2d(conv, engine)
    x = torch.randn(batch, cfg["in_channels"], 11, 13)
    ref = conv(x)
    y = sparse(x)
    assert y.shape == ref.shape and close(y, ref)


def test_to_sparse_leaves_model_alone_and_matches_lenet5():
    torch.manual_seed(0)
    model = LeNet5((1, 28, 28))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            prune_(m, 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = bs.to_sparse(model, engine="numba_csr")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())
    kinds = {type(m) for m in sparse.modules()}
    assert SparseLinear in kinds and SparseConv2d in kinds
    assert set(sparse.sparse_report) == {"features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"}
    for batch in (1, 16):
        x = torch.rand(batch, 1, 28, 28)
        assert close(sparse(x), model(x))


def test_measured_choice_is_the_fastest_measured_and_outputs_match():
    spec = make_spec("lenet300")
    model = build_model(spec)
    model.brainsurgeon_spec = spec
    prune_(model.net[1], 0.95)
    prune_(model.net[3], 0.95)  # the last layer, net.5, is left dense
    sparse = bs.to_sparse(model, batch_size=4)
    report = sparse.sparse_report
    for name in ("net.1", "net.3"):
        entry = report[name]
        # the report rounds times to 4 decimals: two engines may tie there, so compare times, not names
        assert entry["times_ms"][entry["engine"]] == min(entry["times_ms"].values())
        csr = CSR.from_dense(model.get_submodule(name).weight)
        assert set(entry["times_ms"]) == {"dense", *(e for e in USABLE if get_engine(e).supports(csr) is None)}
        assert entry["speedup_vs_dense"] >= 1.0
        assert isinstance(sparse.get_submodule(name), nn.Linear if entry["engine"] == "dense" else SparseLinear)
    assert report["net.5"]["engine"] == "dense" and "below" in report["net.5"]["reason"]
    assert "times_ms" not in report["net.5"]  # not even timed
    x = torch.rand(4, 1, 28, 28)
    assert close(sparse(x), model(x))


def test_low_sparsity_grouped_and_float64_layers_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(
        prune_(nn.Conv2d(4, 4, 3, groups=2), 0.9), prune_(nn.Conv2d(4, 4, 3), 0.1), nn.Flatten(),
        prune_(nn.Linear(4 * 6 * 6, 5), 0.9),
    )
    sparse = bs.to_sparse(model, example_input=torch.rand(1, 4, 10, 10), engine="numba_csr", min_sparsity=0.5)
    assert sparse.sparse_report["0"]["engine"] == "dense" and "groups" in sparse.sparse_report["0"]["reason"]
    assert sparse.sparse_report["3"]["engine"] == "numba_csr"
    assert isinstance(sparse[0], nn.Conv2d) and isinstance(sparse[3], SparseLinear)
    measured = bs.to_sparse(model, example_input=torch.rand(1, 4, 10, 10), min_sparsity=0.5)
    assert measured.sparse_report["1"]["engine"] == "dense" and "below" in measured.sparse_report["1"]["reason"]
    double = bs.to_sparse(prune_(nn.Linear(20, 20), 0.9).double(), engine="numba_csr")
    assert isinstance(double, nn.Linear) and "dtype" in double.sparse_report[""]["reason"]


def test_saving_a_sparse_model_stores_dense_weights(tmp_path):
    spec = make_spec("lenet300")
    model = build_model(spec)
    model.brainsurgeon_spec = spec
    for m in model.modules():
        if isinstance(m, nn.Linear):
            prune_(m, 0.9)
    sparse = bs.to_sparse(model, engine="numba_csr")
    bs.save(sparse, tmp_path / "s.safetensors")
    loaded = bs.load(tmp_path / "s.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_bad_arguments():
    with pytest.raises(BrainsurgeonError, match="unknown sparse engine"):
        bs.to_sparse(nn.Linear(3, 3), engine="cusparse")
    with pytest.raises(BrainsurgeonError, match="batch_size"):
        bs.to_sparse(nn.Linear(3, 3), batch_size=0)
    with pytest.raises(BrainsurgeonError, match="example input"):
        bs.to_sparse(nn.Linear(3, 3), example_input=torch.rand(1, 4))


@pytest.mark.parametrize("engine", [e for e in ALL_USABLE if not e.endswith("_serial")])
def test_sparse_models_deep_copy(engine):
    import copy

    model = nn.Sequential(prune_(nn.Linear(30, 20), 0.9), nn.ReLU(), prune_(nn.Linear(20, 5), 0.9))
    sparse = bs.to_sparse(model, engine=engine)
    clone = copy.deepcopy(sparse)
    again = bs.to_sparse(sparse, engine=engine)  # already-sparse layers are left as they are
    x = torch.rand(3, 30)
    assert torch.equal(clone(x), sparse(x)) and torch.equal(again(x), sparse(x))
    assert close(sparse(x), model(x))
    if engine == "torch_bsr":  # 5 output rows: no block size fits, so that layer stays dense, said why
        assert isinstance(sparse[2], nn.Linear) and "block size" in sparse.sparse_report["2"]["reason"]
