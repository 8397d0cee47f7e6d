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
    assert e.nbytes == formats.delta_size(((t.reshape(-1) != 0).nonzero().reshape(-1)).numpy(), bits, 4, t.numel())
    assert same_bits(t, formats.decode(e))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_delta_fillers_cover_trailing_zeros(bits):
    t = torch.zeros(40, 5000)
    t[0, 3] = 1.0  # one non-zero, then 199,996 zeros: fillers must run on to within one gap of the end
    e = formats.encode_delta(t, bits)
    cap = (1 << bits) - 1
    assert e.info["entries"] == 1 + (t.numel() - 1 - 3) // cap
    assert same_bits(t, formats.decode(e))
    empty = formats.encode_delta(torch.zeros(3, 7), 4)  # no non-zero at all: fillers only
    assert same_bits(torch.zeros(3, 7), formats.decode(empty))


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
        size = formats.stored_size
        assert size(e) == min(size(formats.encode_dense(t)), size(formats.encode_csr(t)), size(e))


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
    # float32 value + an 8-bit gap is 5 bytes; fillers, biases and the header add a little. The
    # values' byte planes are then deflated (the exponent byte carries ~2 bits): below 5, above 3.5
    assert "net.1.weight" in report["packed"]  # net.3 keeps under PACK_MIN_ELEMENTS values
    assert 3.5 <= report["bytes_per_nonzero"] < 5.0


# ----------------------------------------------------------------------------- bad input
def _rewrite(path, meta_change=None, drop=None, rechecksum=False):
    """Edit a saved file's header or arrays; ``rechecksum``: as a crafted file would, with a valid checksum."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(path))
    meta.update(meta_change or {})
    for k in drop or ():
        arrays.pop(k)
    if rechecksum:
        meta[storage.CHECKSUM_KEY] = storage._checksum(arrays, meta)
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
    _rewrite(saved, {storage.VERSION_KEY: str(storage.FORMAT_VERSION + 1)})
    with pytest.raises(BrainsurgeonError, match="newer than this brainsurgeon"):
        bs.load(saved)


def test_unknown_tensor_encoding_is_refused(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        table = json.loads(f.metadata()[storage.TENSORS_KEY])
    table["net.1.weight"]["encoding"] = "huffman"
    _rewrite(saved, {storage.TENSORS_KEY: json.dumps(table)})
    with pytest.raises(BrainsurgeonError, match="checksum"):  # the checksum covers the header too
        bs.load(saved)
    _rewrite(saved, {storage.TENSORS_KEY: json.dumps(table)}, rechecksum=True)
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
    _rewrite(saved, drop=[k for k in load_file(str(saved)) if k.startswith("net.3.weight::")][:1], rechecksum=True)
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


# ----------------------------------------------------------------------------- crafted files (issue 9)
def _crafted(saved, name, change):
    """Edit tensor ``name``'s header entry and/or arrays and give the file a valid checksum."""
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(saved))
    table = json.loads(meta[storage.TENSORS_KEY])
    change(table[name], arrays)
    meta[storage.TENSORS_KEY] = json.dumps(table)
    meta[storage.CHECKSUM_KEY] = storage._checksum(arrays, meta)
    save_file(arrays, str(saved), metadata=meta)


def _nm_file(tmp_path):
    t = torch.randn(8, 16)
    t.reshape(8, 4, 4)[..., 2:] = 0  # 2:4
    path = tmp_path / "nm.safetensors"
    assert bs.save(Holder({"w": t}), path)["encodings"]["w"] == "nm"
    return path, t


def _csr_file(tmp_path):
    t = sparse_tensor((40, 30), 0.6)
    path = tmp_path / "csr.safetensors"
    h = Holder({"w": t})
    arrays, table, _ = storage.encode_state({"w": t}, "sparse")
    enc = formats.encode_csr(t)  # force CSR whatever is smallest
    arrays = {f"w::{k}": v for k, v in enc.parts.items()}
    table = {"w": {"encoding": "csr", "shape": list(t.shape), "dtype": "float32", **enc.info}}
    save_file(arrays, str(path), metadata=storage.file_metadata(arrays, table, "sparse", None))
    assert torch.equal(bs.load(path, model=h).w, t)
    return path, t


def _template(t):
    return Holder({"w": torch.zeros_like(t)})


def test_nm_with_repeated_positions_is_refused(tmp_path):
    path, t = _nm_file(tmp_path)

    def repeat(entry, arrays):  # both values of the first group at position 0 (2-bit positions, 4 per byte)
        arrays["w::positions"][0] = 0

    _crafted(path, "w", repeat)
    with pytest.raises(BrainsurgeonError, match="N:M positions repeat"):
        bs.load(path, model=_template(t))


def test_csr_with_duplicate_column_is_refused(tmp_path):
    path, t = _csr_file(tmp_path)

    def dup(entry, arrays):
        col = arrays["w::col_idx"]
        col[1] = col[0]  # the first row has >= 2 values (checked below): its second lands on its first
    assert int((t[0] != 0).sum()) >= 2
    _crafted(path, "w", dup)
    with pytest.raises(BrainsurgeonError, match="column indices repeat"):
        bs.load(path, model=_template(t))


@pytest.mark.parametrize("field,value,match", [
    ("bits", 0, "'bits' is 0"), ("m", 0, "'m' is 0"), ("n", 0, "'n' is 0"), ("m", 4.0, "not an integer"),
    ("bits", None, "not an integer"), ("n", True, "not an integer")])
def test_nm_header_fields_are_validated(tmp_path, field, value, match):
    path, t = _nm_file(tmp_path)
    _crafted(path, "w", lambda entry, arrays: entry.__setitem__(field, value))
    with pytest.raises(BrainsurgeonError, match=match):
        bs.load(path, model=_template(t))


@pytest.mark.parametrize("key", ["bits", "entries", "shape", "dtype", "encoding"])
def test_missing_header_key_is_refused(tmp_path, key):
    t = sparse_tensor((50, 300), 0.97)
    path = tmp_path / "d.safetensors"
    assert bs.save(Holder({"w": t}), path)["encodings"]["w"] == "delta"
    _crafted(path, "w", lambda entry, arrays: entry.pop(key))
    with pytest.raises(BrainsurgeonError):
        bs.load(path, model=_template(t))


@pytest.mark.parametrize("shape", [[50, 300.5], [50.0, 300], ["50", 300], [50, -300], [50, True], "15000", None])
def test_bad_shapes_are_refused(tmp_path, shape):
    t = sparse_tensor((50, 300), 0.97)
    path = tmp_path / "d.safetensors"
    bs.save(Holder({"w": t}), path)
    _crafted(path, "w", lambda entry, arrays: entry.__setitem__("shape", shape))
    with pytest.raises(BrainsurgeonError):
        bs.load(path, model=_template(t))


@pytest.mark.parametrize("encoding", ["delta", "csr", "nm"])
def test_allocation_bomb_is_refused_before_allocating(tmp_path, encoding, monkeypatch):
    if encoding == "delta":
        t = sparse_tensor((50, 300), 0.97)
        path = tmp_path / "d.safetensors"
        bs.save(Holder({"w": t}), path)
    else:
        path, t = (_csr_file if encoding == "csr" else _nm_file)(tmp_path)
    _crafted(path, "w", lambda entry, arrays: entry.__setitem__("shape", [20_000, 25_000]))
    real_zeros = torch.zeros

    def guarded_zeros(*size, **kw):  # nothing of the declared 5e8 elements may be allocated
        n = 1
        for s in (size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size):
            n *= int(s)
        assert n < 10_000_000, f"allocated {n} elements"
        return real_zeros(*size, **kw)

    monkeypatch.setattr(torch, "zeros", guarded_zeros)
    with pytest.raises(BrainsurgeonError):
        bs.load(path, model=_template(t))


def test_version_1_files_still_load(tmp_path):
    """A file as version 1 wrote it (dense entries in the table, checksum over the arrays only)."""
    t = sparse_tensor((30, 200), 0.95)
    bias = torch.randn(30)
    e = formats.encode_csr(t)
    arrays = {**{f"w::{k}": v for k, v in e.parts.items()}, "b": bias}
    table = {"w": {"encoding": "csr", "shape": [30, 200], "dtype": "float32", **e.info},
             "b": {"encoding": "dense", "shape": [30], "dtype": "float32"}}
    meta = {storage.FORMAT_KEY: "brainsurgeon-sparse", storage.VERSION_KEY: "1",
            storage.TENSORS_KEY: json.dumps(table), storage.CHECKSUM_KEY: storage._checksum(arrays)}
    save_file(arrays, str(tmp_path / "v1.safetensors"), metadata=meta)
    loaded = bs.load(tmp_path / "v1.safetensors", model=Holder({"w": torch.zeros(30, 200), "b": torch.zeros(30)}))
    assert same_bits(t, loaded.w) and torch.equal(bias, loaded.b)


def test_channel_pruned_compact_model_is_never_larger_than_dense(tmp_path):
    """Issue 9: a channel-pruned (compact, all dense) resnet was exported at 117.5% of its dense size."""
    spec = make_spec("resnet")
    model = build_model(spec)
    model.brainsurgeon_spec = spec
    data = (torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    pruned = bs.prune(model, data, "l1-norm", 0.5, structure="channel").model
    sparse = bs.save(pruned, tmp_path / "s.safetensors")
    dense = bs.save(pruned, tmp_path / "d.safetensors", format="dense")
    assert sparse["bytes"] <= dense["bytes"]
    # was 1.175 of the float32 bytes: the table listed every dense entry again; what is left is the
    # safetensors header of ~100 small tensors (BatchNorm), which the dense file pays too
    assert sparse["ratio_to_dense"] < 1.12, sparse["ratio_to_dense"]
    loaded = bs.load(tmp_path / "s.safetensors")
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_to_an_existing_directory_is_refused(tmp_path):
    with pytest.raises(BrainsurgeonError, match="is a directory"):
        bs.save(nn.Linear(2, 2), tmp_path)
    assert list(tmp_path.iterdir()) == []
