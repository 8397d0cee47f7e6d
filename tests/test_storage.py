"""Sparse storage: bitwise round trips for every encoding and index width, size bars, bad input."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.io import load_model
from brainsurgeon.models import build_model, make_spec
from brainsurgeon.sparse import formats, storage


def sparse_tensor(shape, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    t[torch.rand(*shape, generator=g) < sparsity] = 0.0
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, except that a zero's sign is not kept (documented: -0.0 loads as +0.0)."""
    a = torch.where(a == 0, torch.zeros_like(a), a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


class Holder(nn.Module):
    """A module holding arbitrary tensors as buffers, to push synthetic tensors through a file."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.clone())


@pytest.fixture(scope="module")
def pruned_lenet():
    spec = make_spec("lenet300")
    model = build_model(spec)
    model.brainsurgeon_spec = spec
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    return spec, model, {s: bs.prune(model, data, "magnitude", s).model for s in (0.9, 0.95)}


# ----------------------------------------------------------------------------- encodings
@pytest.mark.parametrize("cols,expected", [(200, torch.uint8), (1000, torch.int16), (70_000, torch.int32)])
def test_csr_uses_smallest_column_index_and_round_trips(cols, expected):
    t = sparse_tensor((3, cols), 0.9)
    e = formats.encode_csr(t)
    assert e.parts["col_idx"].dtype == expected
    assert e.parts["row_ptr"].dtype == formats.smallest_index_dtype(int((t != 0).sum()))
    assert same_bits(t, formats.decode(e))


def test_csr_row_pointer_width_follows_nonzero_count():
    small = formats.encode_csr(sparse_tensor((4, 50), 0.5))  # ~100 non-zeros
    large = formats.encode_csr(sparse_tensor((400, 500), 0.5))  # ~100k non-zeros
    assert small.parts["row_ptr"].dtype == torch.uint8
    assert large.parts["row_ptr"].dtype == torch.int32


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_delta_round_trip_with_filler_zeros(bits):
    # very sparse, so gaps overflow 4 and 8 bits and need filler entries
    t = sparse_tensor((50, 3000), 0.999, seed=bits)
    t[0, 0] = 1.5  # a non-zero at position 0 (first gap counted from -1)
    t[-1, -1] = -2.5  # and at the very end
    e = formats.encode_delta(t, bits)
    nnz = int((t != 0).sum())
    if bits < 16:
        assert e.info["entries"] > nnz  # fillers were needed
    assert e.nbytes == formats.delta_size(((t.reshape(-1) != 0).nonzero().reshape(-1)).numpy(), bits, 4)
    assert same_bits(t, formats.decode(e))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 16), (8, 32)])
def test_packed_nm_round_trip(n, m):
    t = torch.randn(6, 4 * m)
    groups = t.reshape(6, 4, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.rand_like(groups).argsort(-1)[..., :n], True)
    t = (groups * keep).reshape(6, 4 * m)
    t[0, :m] = 0  # a group with fewer than N survivors
    assert formats.nm_pattern(t, m) == n
    e = formats.encode_nm(t, n, m)
    assert e.parts["values"].numel() == 6 * 4 * n
    assert same_bits(t, formats.decode(e))


def test_encode_best_prefers_smallest():
    dense = torch.randn(30, 40)
    assert formats.encode_best(dense).encoding == "dense"
    assert formats.encode_best(torch.randn(40)).encoding == "dense"  # biases as-is
    assert formats.encode_best(sparse_tensor((300, 784), 0.9)).encoding in ("csr", "delta")
    nm = sparse_tensor((64, 64), 0.0)
    nm.reshape(64, 16, 4)[..., 2:] = 0  # 2:4
    best = formats.encode_best(nm)
    assert best.encoding == "nm" and best.info["m"] == 4 and best.info["n"] == 2
    for t in (dense, nm, sparse_tensor((300, 784), 0.9)):
        e = formats.encode_best(t)
        assert e.nbytes == min(formats.encode_dense(t).nbytes, formats.encode_csr(t).nbytes, e.nbytes)


def test_negative_zero_loads_as_positive_zero_and_nonzeros_are_bitwise():
    t = torch.tensor([[1.0, -0.0, 3.0, 0.0], [-0.0, -0.0, 5e-39, float("nan")]])  # subnormal and NaN kept too
    for enc in (formats.encode_csr(t), formats.encode_delta(t, 4)):
        out = formats.decode(enc)
        assert not torch.signbit(out[t == 0]).any()
        assert same_bits(torch.nan_to_num(t, nan=7.0), torch.nan_to_num(out, nan=7.0))
        assert torch.isnan(out[1, 3])


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("fmt", ["sparse", "dense"])
def test_file_round_trip_is_bitwise_for_mixed_tensors(tmp_path, fmt):
    nm = torch.randn(8, 16)
    nm.reshape(8, 4, 4)[..., 1:] = 0
    tensors = {
        "wide": sparse_tensor((2, 70_000), 0.99),  # int32 column indices
        "lenet": sparse_tensor((300, 784), 0.9),
        "conv": sparse_tensor((16, 6, 5, 5), 0.8),
        "nm": nm,
        "bias": torch.randn(300),
        "dense": torch.randn(10, 10),
        "count": torch.tensor(7, dtype=torch.int64),
        "wide64": sparse_tensor((20, 30), 0.9).to(torch.float64),
    }
    report = bs.save(Holder(tensors), tmp_path / "m.safetensors", format=fmt)
    loaded = bs.load(tmp_path / "m.safetensors", model=Holder({k: torch.zeros_like(v) for k, v in tensors.items()}))
    for k, v in tensors.items():
        got = getattr(loaded, k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
        if v.is_floating_point() and v.dtype == torch.float32:
            assert same_bits(v, got)
    if fmt == "sparse":
        assert report["encodings"]["nm"] == "nm" and report["encodings"]["bias"] == "dense"
        assert report["encodings"]["lenet"] in ("csr", "delta")
    else:
        assert set(report["encodings"].values()) == {"dense"}


def test_model_round_trip_rebuilds_from_spec_and_leaves_input_alone(tmp_path, pruned_lenet):
    spec, _, pruned = pruned_lenet
    model = pruned[0.9]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bs.save(model, tmp_path / "s.safetensors")
    loaded = bs.load(tmp_path / "s.safetensors")
    assert loaded.brainsurgeon_spec == spec
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # save did not touch the model
        assert same_bits(v, loaded.state_dict()[k]), k
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_load_into_template_returns_copy(tmp_path, pruned_lenet):
    spec, model, pruned = pruned_lenet
    bs.save(pruned[0.95], tmp_path / "s.safetensors", spec=spec)
    template = build_model(spec)
    template_state = {k: v.clone() for k, v in template.state_dict().items()}
    loaded = bs.load(tmp_path / "s.safetensors", model=template)
    assert loaded is not template
    assert all(torch.equal(v, template_state[k]) for k, v in template.state_dict().items())
    assert all(torch.equal(v, pruned[0.95].state_dict()[k]) for k, v in loaded.state_dict().items())


def test_dense_file_is_readable_by_io_load_model(tmp_path, pruned_lenet):
    _, _, pruned = pruned_lenet
    bs.save(pruned[0.9], tmp_path / "d.safetensors", format="dense")
    other = load_model(tmp_path / "d.safetensors")
    assert all(torch.equal(v, pruned[0.9].state_dict()[k]) for k, v in other.state_dict().items())


def test_nm_pruned_model_is_stored_packed(tmp_path, pruned_lenet):
    spec, model, _ = pruned_lenet
    data = (torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    nm_model = bs.prune(model, data, "magnitude", structure="2:4").model
    report = bs.save(nm_model, tmp_path / "nm.safetensors")
    assert report["encodings"]["net.1.weight"] == "nm"
    loaded = bs.load(tmp_path / "nm.safetensors")
    assert all(torch.equal(v, nm_model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- size bars
@pytest.mark.parametrize("sparsity,bar", [(0.9, 0.16), (0.95, 0.09)])
def test_size_bars(tmp_path, pruned_lenet, sparsity, bar):
    _, model, pruned = pruned_lenet
    bs.save(model, tmp_path / "dense.safetensors", format="dense")
    report = bs.save(pruned[sparsity], tmp_path / "sparse.safetensors")
    dense_bytes = os.path.getsize(tmp_path / "dense.safetensors")
    assert report["bytes"] == os.path.getsize(tmp_path / "sparse.safetensors")
    assert report["bytes"] <= bar * dense_bytes, (report["bytes"], dense_bytes)
    assert report["nonzeros"] == sum(int((v != 0).sum()) for v in pruned[sparsity].state_dict().values())
    # float32 value + an 8-bit gap is 5 bytes; fillers, biases and the header add a little
    assert 5.0 <= report["bytes_per_nonzero"] < 5.5


# ----------------------------------------------------------------------------- bad input
def _rewrite(path, meta_change=None, drop=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(path))
    meta.update(meta_change or {})
    for k in drop or ():
        arrays.pop(k)
    save_file(arrays, str(path), metadata=meta)


@pytest.fixture
def saved(tmp_path, pruned_lenet):
    spec, _, pruned = pruned_lenet
    path = tmp_path / "s.safetensors"
    bs.save(pruned[0.9], path)
    return path


def test_unknown_format_is_refused(saved):
    _rewrite(saved, {storage.FORMAT_KEY: "someone-else"})
    with pytest.raises(BrainsurgeonError, match="unknown format"):
        bs.load(saved)


def test_newer_version_is_refused(saved):
    _rewrite(saved, {storage.VERSION_KEY: "2"})
    with pytest.raises(BrainsurgeonError, match="newer than this brainsurgeon"):
        bs.load(saved)


def test_unknown_tensor_encoding_is_refused(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        table = json.loads(f.metadata()[storage.TENSORS_KEY])
    table["net.1.weight"]["encoding"] = "huffman"
    _rewrite(saved, {storage.TENSORS_KEY: json.dumps(table)})
    with pytest.raises(BrainsurgeonError, match="unknown tensor encoding"):
        bs.load(saved)


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    for keep in (len(data) - 100, 200, 5):
        saved.write_bytes(data[:keep])
        with pytest.raises(BrainsurgeonError, match="truncated or corrupted"):
            bs.load(saved)


def test_corrupted_data_fails_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-50] ^= 0xFF  # a flipped byte inside the tensor data
    saved.write_bytes(bytes(data))
    with pytest.raises(BrainsurgeonError, match="checksum"):
        bs.load(saved)


def test_missing_part_is_refused(saved):
    _rewrite(saved, drop=[k for k in load_file(str(saved)) if k.startswith("net.3.weight::")][:1])
    with pytest.raises(BrainsurgeonError):
        bs.load(saved)


def test_spec_mismatch_is_refused(saved):
    other_spec = make_spec("lenet300", hidden=(200, 100))
    other = build_model(other_spec)
    other.brainsurgeon_spec = other_spec
    with pytest.raises(BrainsurgeonError, match="architecture"):
        bs.load(saved, model=other)
    bare = build_model(other_spec)  # no spec attribute: the shapes still tell
    with pytest.raises(BrainsurgeonError, match="does not match the model's architecture"):
        bs.load(saved, model=bare)


def test_no_spec_needs_template(tmp_path):
    bs.save(nn.Linear(4, 3), tmp_path / "l.safetensors")
    with pytest.raises(BrainsurgeonError, match="model="):
        bs.load(tmp_path / "l.safetensors")
    assert isinstance(bs.load(tmp_path / "l.safetensors", model=nn.Linear(4, 3)), nn.Linear)


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(BrainsurgeonError):
        bs.load(path, model=nn.Linear(2, 2))
    assert not marker.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(BrainsurgeonError, match="unknown storage format"):
        bs.save(nn.Linear(2, 2), tmp_path / "x.safetensors", format="csr")
    with pytest.raises(BrainsurgeonError, match="does not exist"):
        bs.load(tmp_path / "missing.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- CLI
def test_cli_export_sparse_and_dense(tmp_path, pruned_lenet):
    from typer.testing import CliRunner

    import brainsurgeon.cli.export  # noqa: F401  (registers the command)
    from brainsurgeon.cli import app
    from brainsurgeon.io import save_weights

    spec, _, pruned = pruned_lenet
    save_weights(pruned[0.95], tmp_path / "p.safetensors", spec=spec)
    runner = CliRunner()
    args = ["export", "--model", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "s.safetensors")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bytes per non-zero" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, args + ["--force", "--json"]).exit_code == 0
    dense = runner.invoke(app, ["export", "--model", str(tmp_path / "s.safetensors"), "--format", "dense",
                                "--out", str(tmp_path / "d.safetensors")])
    assert dense.exit_code == 0, dense.output
    assert (tmp_path / "s.safetensors").stat().st_size <= 0.09 * (tmp_path / "d.safetensors").stat().st_size
    loaded = load_model(tmp_path / "d.safetensors")
    assert all(torch.equal(v, pruned[0.95].state_dict()[k]) for k, v in loaded.state_dict().items())
    bad = runner.invoke(app, ["export", "--model", str(tmp_path / "p.safetensors"), "--format", "zip",
                              "--out", str(tmp_path / "z")])
    assert bad.exit_code == 2 and "--format" in bad.output
