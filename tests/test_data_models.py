"""Data loaders, data files, model specs, weight files and atomic writes."""
from __future__ import annotations

import gzip
import json
import struct
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from brainsurgeon import data as bsdata
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.io import SPEC_KEY, atomic_path, load_model, load_state, read_spec, save_weights, write_json
from brainsurgeon.models import ARCHITECTURES, build_model, make_spec

# ----------------------------------------------------------------------------- digits


def test_digits_splits_are_fixed_disjoint_and_normalised():
    d = bsdata.load_digits()
    assert d.x_train.shape[1:] == (1, 8, 8) and d.input_shape == (1, 8, 8)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert len(d.x_test) == round(1797 * 0.25)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.long
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    assert d.num_classes == 10 and set(d.y_test.tolist()) == set(range(10))
    again = bsdata.load_digits()
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_train, again.y_train)
    # the two splits hold different images: every sklearn image appears exactly once overall
    from sklearn.datasets import load_digits as sk

    raw = torch.tensor(sk().images, dtype=torch.float32).reshape(1797, -1) / 16
    both = torch.cat([d.x_train, d.x_test]).reshape(1797, -1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, raw.tolist()))
    assert not torch.equal(bsdata.load_digits(seed=1).y_test, d.y_test)


# ----------------------------------------------------------------------------- idx / Fashion-MNIST


def _write_idx(path, array: np.ndarray, compress: bool = False, truncate: int = 0, dtype_code: int = 0x08) -> None:
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _fake_fashion(root, n_train=6, n_test=4, compress=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, a in arrays.items():
        _write_idx(root / (stem + (".gz" if compress else "")), a, compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_on_small_files(tmp_path, compress):
    arrays = _fake_fashion(tmp_path, compress=compress)
    assert bsdata.fashion_mnist_available(tmp_path)
    ds = bsdata.load_fashion_mnist(tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.allclose(ds.x_train, expected)
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.y_train.dtype == torch.long


def test_truncated_or_foreign_idx_files_are_refused(tmp_path):
    a = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    _write_idx(tmp_path / "cut", a, truncate=5)
    with pytest.raises(BrainsurgeonError, match="truncated"):
        bsdata._read_idx(tmp_path / "cut")
    _write_idx(tmp_path / "floats", a, dtype_code=0x0D)
    with pytest.raises(BrainsurgeonError, match="unsigned-byte idx"):
        bsdata._read_idx(tmp_path / "floats")
    (tmp_path / "tiny").write_bytes(b"\x00")
    with pytest.raises(BrainsurgeonError, match="too short"):
        bsdata._read_idx(tmp_path / "tiny")


def test_missing_fashion_files_say_how_to_get_them(tmp_path):
    assert not bsdata.fashion_mnist_available(tmp_path)
    with pytest.raises(BrainsurgeonError, match="dataset-fashion-mnist.*--data-dir"):
        bsdata.load_fashion_mnist(tmp_path)


def test_fashion_mnist_from_the_system_or_from_idx_files(tmp_path):
    """The real files when installed; otherwise the same checks on generated idx files."""
    if bsdata.fashion_mnist_available():
        ds = bsdata.load_dataset("fashion-mnist")
        n_train, n_test = 60000, 10000
    else:
        _fake_fashion(tmp_path, n_train=12, n_test=5)
        ds = bsdata.load_dataset("fashion-mnist", tmp_path)
        n_train, n_test = 12, 5
    assert ds.x_train.shape == (n_train, 1, 28, 28) and ds.x_test.shape == (n_test, 1, 28, 28)
    assert len(ds.y_train) == n_train and len(ds.y_test) == n_test
    assert 0.0 <= float(ds.x_test.min()) and float(ds.x_test.max()) <= 1.0
    assert int(ds.y_train.max()) <= 9


# ----------------------------------------------------------------------------- data files


def _xy(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 2, 2, generator=g), torch.arange(n) % 3


def test_npz_and_safetensors_data_files(tmp_path):
    from safetensors.torch import save_file

    x, y = _xy()
    np.savez(tmp_path / "d.npz", x=x.double().numpy(), y=y.int().numpy())
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    for name in ("d.npz", "d.safetensors"):
        xl, yl = bsdata.load_tensor_file(tmp_path / name)
        assert xl.dtype == torch.float32 and yl.dtype == torch.long
        assert torch.allclose(xl, x) and torch.equal(yl, y)
        ds = bsdata.load_dataset(str(tmp_path / name))
        assert len(ds.x_test) == 2 and torch.equal(ds.x_test, xl[-2:]) and torch.equal(ds.x_train, xl[:-2])


def test_data_files_without_x_or_y_are_refused(tmp_path):
    from safetensors.torch import save_file

    np.savez(tmp_path / "nox.npz", inputs=np.zeros((2, 3)), y=np.zeros(2))
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "noy.safetensors"))
    with pytest.raises(BrainsurgeonError, match=r"lacks arrays \['x'\]"):
        bsdata.load_tensor_file(tmp_path / "nox.npz")
    with pytest.raises(BrainsurgeonError, match=r"lacks tensors \['y'\]"):
        bsdata.load_tensor_file(tmp_path / "noy.safetensors")
    with pytest.raises(BrainsurgeonError, match="does not exist"):
        bsdata.load_tensor_file(tmp_path / "absent.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(BrainsurgeonError, match=".npz or .safetensors"):
        bsdata.load_tensor_file(tmp_path / "d.csv")
    with pytest.raises(BrainsurgeonError, match="unknown data"):
        bsdata.load_dataset("mnist-please")


def test_pickled_npz_is_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(BrainsurgeonError, match="without pickle"):
        bsdata.load_tensor_file(tmp_path / "obj.npz")


# ----------------------------------------------------------------------------- models and specs


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reference_models_round_trip_through_safetensors(arch, tmp_path):
    spec = make_spec(arch, input_shape=(1, 8, 8), num_classes=5)
    json.dumps(spec)  # a spec is JSON
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = tmp_path / "m.safetensors"
    save_weights(model, path, spec)
    assert read_spec(path) == spec
    loaded = load_model(path)
    assert loaded.brainsurgeon_spec == spec
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    assert loaded(x).shape == (3, 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_lenet_models_fit_28x28_inputs():
    for arch in ("lenet300", "lenet5"):
        m = build_model(make_spec(arch))
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_bad_specs_are_refused():
    with pytest.raises(BrainsurgeonError, match="unknown architecture"):
        make_spec("vgg16")
    with pytest.raises(BrainsurgeonError, match="unknown architecture"):
        build_model({"arch": "vgg16"})
    with pytest.raises(BrainsurgeonError, match="either 'arch'"):
        build_model({"kwargs": {}})
    with pytest.raises(BrainsurgeonError, match="must be a dict"):
        build_model("lenet300")
    with pytest.raises(BrainsurgeonError, match="package.module:function"):
        build_model({"factory": "no_colon_here"}, factory="no_colon_here")
    with pytest.raises(BrainsurgeonError, match="cannot import"):
        build_model({"factory": "surely_not_a_module_xyz:make"}, factory="surely_not_a_module_xyz:make")
    with pytest.raises(BrainsurgeonError, match="no callable"):
        build_model({"factory": "torch.nn:not_a_thing"}, factory="torch.nn:not_a_thing")


FACTORY_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def make(width=6, classes=3):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, classes))
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """An importable user module ``usermodels_bs_test`` with a factory ``make``."""
    (tmp_path / "usermodels_bs_test.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usermodels_bs_test:make"


def test_factory_specs_round_trip(factory_module, tmp_path):
    spec = {"factory": factory_module, "kwargs": {"width": 5}}
    model = build_model(spec, factory=factory_module)
    assert model[1].out_features == 5
    save_weights(model, tmp_path / "f.safetensors", spec)
    loaded = load_model(tmp_path / "f.safetensors", factory=factory_module)  # a file's factory runs only when named
    assert loaded.brainsurgeon_spec == spec
    assert torch.equal(loaded[1].weight, model[1].weight)


def test_torch_files_load_with_weights_only(factory_module, tmp_path):
    spec = {"factory": factory_module, "kwargs": {}}
    model = build_model(spec, factory=factory_module)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", spec)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(BrainsurgeonError, match="no architecture spec"):
        load_model(tmp_path / "w.pt")


class _Trap:
    """Unpickling this would create the marker file: weights_only loading must refuse instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_torch_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"w": torch.zeros(1), "trap": _Trap(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BrainsurgeonError, match="weights_only=True"):
        load_state(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(BrainsurgeonError, match="does not hold a state_dict"):
        load_state(tmp_path / "list.pt")


def test_weight_file_errors(tmp_path):
    with pytest.raises(BrainsurgeonError, match="does not exist"):
        load_state(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BrainsurgeonError, match="not a readable safetensors"):
        load_state(tmp_path / "junk.safetensors")
    spec = make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_weights(build_model(make_spec("lenet300", input_shape=(1, 8, 8), num_classes=4)), tmp_path / "w.safetensors", spec)
    with pytest.raises(BrainsurgeonError, match="do not fit the architecture"):
        load_model(tmp_path / "w.safetensors")
    save_weights(nn.Linear(2, 2), tmp_path / "nospec.safetensors")
    with pytest.raises(BrainsurgeonError, match="no architecture spec"):
        load_model(tmp_path / "nospec.safetensors")


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})  # fails mid-serialisation
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    write_json(target, {"t": torch.tensor([1.5]), "n": np.float64(2.0)})
    assert json.loads(target.read_text()) == {"t": [1.5], "n": 2.0}
    assert list(tmp_path.iterdir()) == [target]


def test_save_weights_stores_the_spec_in_metadata(tmp_path):
    from safetensors import safe_open

    spec = make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_weights(build_model(spec), tmp_path / "m.safetensors", spec, extra={"note": {"a": 1}})
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[SPEC_KEY]) == spec and json.loads(meta["note"]) == {"a": 1}


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_matches_a_direct_computation():
    x = torch.randn(10, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    model = nn.Linear(3, 3).train()
    result = evaluate(model, (x, y), batch_size=4)
    with torch.no_grad():
        out = model(x)
    assert result["samples"] == 10
    assert result["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-6)
    assert model.training  # mode restored
    mean_loss = evaluate(model, (x, y), loss_fn=nn.CrossEntropyLoss(), batch_size=3)
    assert mean_loss["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_evaluate_refuses_data_that_does_not_fit():
    with pytest.raises(BrainsurgeonError, match=r"does not fit the model.*\(4, 5\)"):
        evaluate(nn.Linear(3, 2), (torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(BrainsurgeonError, match="loss cannot be computed"):
        evaluate(nn.Linear(3, 2), (torch.zeros(4, 3), torch.full((4,), 7)))
