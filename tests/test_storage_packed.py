"""Format version 3: float arrays as deflated byte planes. Bitwise round trips, sizes, crafted files."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.sparse import formats, storage


class Holder(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.clone())


def low_entropy_weight(shape, sparsity, seed=0):
    """Values of a narrow range (few exponents) with full mantissas: the top byte deflates, the rest do not."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(*shape).uniform_(0.01, 0.05, generator=g) * torch.sign(torch.randn(*shape, generator=g))
    t[torch.rand(*shape, generator=g) < sparsity] = 0.0
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def test_pack_round_trip_is_bitwise_for_special_values():
    t = low_entropy_weight((64, 128), 0.0)
    flat = t.reshape(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, -3.4e38])
    enc = formats.pack_floats(formats.encode_dense(t))
    assert "packed" in enc.info and "data" not in enc.parts
    planes = enc.info["packed"]["planes"]
    assert [p[0] for p in planes] == ["raw", "raw", "raw", "zlib"]  # only the sign/exponent byte pays
    assert enc.parts["data_packed"].numel() == sum(p[1] for p in planes) < 0.97 * t.numel() * 4
    out = formats.decode(enc)
    assert torch.equal(bits(out), bits(t))


def test_incompressible_values_are_left_alone():
    t = torch.randn(64, 128).view(torch.int32).bitwise_xor(torch.randint(0, 2**30, (64, 128), dtype=torch.int32))
    enc = formats.pack_floats(formats.encode_dense(t.view(torch.float32)))
    assert "packed" not in enc.info and "data" in enc.parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_file_round_trip_with_packing(tmp_path, dtype):
    tensors = {"w": low_entropy_weight((256, 256), 0.7).to(dtype), "emb": low_entropy_weight((512, 64), 0.0).to(dtype),
               "b": torch.randn(256).to(dtype)}
    report = bs.save(Holder(tensors), tmp_path / "m.safetensors")
    assert set(report["packed"]) == {"w", "emb"}  # b: under PACK_MIN_ELEMENTS
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()[storage.VERSION_KEY] == "3"
        assert {"w::values_packed", "emb::data_packed", "b"} <= set(f.keys())
    loaded = bs.load(tmp_path / "m.safetensors", model=Holder({k: torch.zeros_like(v) for k, v in tensors.items()}))
    for k, v in tensors.items():
        assert torch.equal(bits(getattr(loaded, k)), bits(torch.where(v == 0, torch.zeros_like(v), v))), k
    # the same file unpacked is larger by what the planes saved
    unpacked = sum(formats.stored_size(formats.encode_best(v, k), k) for k, v in tensors.items())
    assert report["bytes"] < 0.95 * unpacked


# ----------------------------------------------------------------------------- crafted files
@pytest.fixture
def packed_file(tmp_path):
    path = tmp_path / "p.safetensors"
    bs.save(Holder({"w": low_entropy_weight((128, 128), 0.5)}), path)
    return path


def _craft(path, edit_entry=None, edit_arrays=None, meta_change=None):
    """Rewrite the file as an attacker would: edited header and arrays, with a valid checksum."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(path))
    table = json.loads(meta[storage.TENSORS_KEY])
    if edit_entry:
        edit_entry(table["w"])
    if edit_arrays:
        edit_arrays(arrays)
    meta[storage.TENSORS_KEY] = json.dumps(table)
    meta.update(meta_change or {})
    meta[storage.CHECKSUM_KEY] = storage._checksum(arrays, meta)
    save_file(arrays, str(path), metadata=meta)


def _load(path):
    return bs.load(path, model=Holder({"w": torch.zeros(128, 128)}))


def test_declared_count_beyond_the_tensor_is_refused_before_allocation(packed_file):
    _craft(packed_file, lambda e: e["packed"].__setitem__("count", 10**12))
    with pytest.raises(BrainsurgeonError, match="count"):
        _load(packed_file)


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.__setitem__("codec", "lz4"), "not zlib-planes"),
    (lambda p: p.__setitem__("planes", p["planes"][:3]), "byte planes"),
    (lambda p: p["planes"][0].__setitem__(0, "brotli"), "byte planes"),
    (lambda p: p["planes"][3].__setitem__(1, p["planes"][3][1] + 1), "bytes its planes declare"),
    (lambda p: p.__setitem__("part", "data"), "not zlib-planes"),
])
def test_malformed_packing_entries_are_refused(packed_file, edit, match):
    _craft(packed_file, lambda e: edit(e["packed"]))
    with pytest.raises(BrainsurgeonError, match=match):
        _load(packed_file)


def test_a_stream_that_inflates_past_its_declared_size_is_refused(packed_file):
    """A zip bomb: the top plane replaced by a stream of 10**8 zeros; never more than declared is inflated."""
    bomb = np.frombuffer(zlib.compress(bytes(10**8), 9), np.uint8)

    def edit_arrays(arrays):
        entry = json.loads(meta_table)["w"]["packed"]
        blob = arrays["w::values_packed"].numpy()
        head = sum(p[1] for p in entry["planes"][:3])
        arrays["w::values_packed"] = torch.from_numpy(np.concatenate([blob[:head], bomb]))

    with safe_open(str(packed_file), "pt") as f:
        meta_table = f.metadata()[storage.TENSORS_KEY]
    _craft(packed_file, lambda e: e["packed"]["planes"][3].__setitem__(1, len(bomb)), edit_arrays)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(BrainsurgeonError, match="declared"):
            _load(packed_file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # inflating the whole stream would take 100 MB


def test_a_truncated_stream_is_refused(packed_file):
    def edit_arrays(arrays):
        arrays["w::values_packed"] = arrays["w::values_packed"][:-5].clone()

    _craft(packed_file, lambda e: e["packed"]["planes"][3].__setitem__(1, e["packed"]["planes"][3][1] - 5), edit_arrays)
    with pytest.raises(BrainsurgeonError, match="inflate"):
        _load(packed_file)


def test_packing_in_a_version_2_file_is_refused(packed_file):
    _craft(packed_file, meta_change={storage.VERSION_KEY: "2"})
    with pytest.raises(BrainsurgeonError, match="version 3"):
        _load(packed_file)
