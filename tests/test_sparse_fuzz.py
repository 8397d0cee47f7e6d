"""Loader fuzzing (issue 9): crafted and damaged sparse files load identical weights or raise
BrainsurgeonError -- never another exception, never a wrong weight behind a valid checksum's back,
never an allocation of a size the file's data does not hold."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.sparse import formats, storage

SEED = 1234
MAX_ALLOC = 1_000_000  # elements: the fuzzed file holds ~5,000 weights


class Holder(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.clone())


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def sparse(shape, s):
        t = torch.randn(*shape, generator=g)
        t[torch.rand(*shape, generator=g) < s] = 0
        return t

    nm = torch.randn(12, 32, generator=g)
    nm.reshape(12, 8, 4)[..., 2:] = 0
    nm48 = torch.randn(6, 64, generator=g)
    nm48.reshape(6, 8, 8)[..., 4:] = 0
    # narrow-range values (few exponents): their top byte plane deflates, so they are stored packed
    narrow = torch.empty(70, 80).uniform_(0.01, 0.05, generator=g) * torch.randn(70, 80, generator=g).sign()
    packed_sparse = narrow.clone()
    packed_sparse[torch.rand(70, 80, generator=g) < 0.2] = 0
    return {"csr": sparse((40, 20), 0.6), "delta": sparse((30, 100), 0.97), "far": sparse((4, 3000), 0.999),
            "nm": nm, "nm48": nm48, "bias": torch.randn(12), "count": torch.tensor(3),
            "packed_dense": narrow, "packed_sparse": packed_sparse}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    tensors = _tensors()
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    report = bs.save(Holder(tensors), path)
    encodings = report["encodings"]
    assert {"nm", "delta", "dense"} <= set(encodings.values()), encodings
    assert set(report["packed"]) == {"packed_dense", "packed_sparse"}, report["packed"]
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    return tensors, meta, load_file(str(path)), path.read_bytes()


VALUES = [0, -1, 1, 2, 3, 4, 5, 7, 8, 15, 16, 255, 256, 65535, 2**31, 2**63, -2**63, 1.5, 4.0, "4", "x", None,
          True, [], {}, [20_000, 25_000], [1], [0, 0], [2, 3, 4], [-5, 4]]


def _mutate_packing(rng, spec: dict) -> None:
    """A field of a packed tensor's ``packed`` entry: its count, a plane's codec or length, the codec."""
    action = rng.random()
    if action < 0.3:
        spec["count"] = rng.choice(VALUES + [spec["count"] + 1, spec["count"] - 1, spec["count"] * 2])
    elif action < 0.6 and isinstance(spec.get("planes"), list) and spec["planes"]:
        plane = spec["planes"][rng.randrange(len(spec["planes"]))]
        plane[rng.randrange(2)] = rng.choice(VALUES + ["raw", "zlib", "lz4", plane[1] + 1, plane[1] - 1])
    elif action < 0.75:
        spec["planes"] = rng.choice([spec["planes"][:-1], spec["planes"] + [["raw", 0]], spec["planes"][::-1], {}])
    else:
        spec[rng.choice(["codec", "part", "count", "planes"])] = rng.choice(VALUES + ["zlib-planes", "data", "values"])


def _mutate_header(rng, table: dict) -> None:
    name = rng.choice(sorted(table))
    entry = table[name]
    action = rng.random()
    if isinstance(entry.get("packed"), dict) and rng.random() < 0.5:
        _mutate_packing(rng, entry["packed"])
    elif action < 0.15 and entry:
        entry.pop(rng.choice(sorted(entry)))
    elif action < 0.25:
        entry["encoding"] = rng.choice(["csr", "delta", "nm", "dense", "zip"])
    elif action < 0.35:
        entry["dtype"] = rng.choice(["float16", "int32", "float64", "bool", "complex64", 7])
    elif action < 0.55 and isinstance(entry.get("shape"), list) and entry["shape"]:
        shape = list(entry["shape"])
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([shape[i] + 1, shape[i] - 1, shape[i] * 2, 0, 25_000, shape[i] + 0.5])
        entry["shape"] = rng.choice([shape, shape[::-1], shape + [1]])
    else:
        entry[rng.choice(sorted(entry) + ["bits", "n", "m", "entries"])] = rng.choice(VALUES)


def _mutate_arrays(rng, arrays: dict) -> None:
    key = rng.choice(sorted(k for k in arrays if "::" in k and not k.endswith("::values")))
    a = arrays[key].clone()
    flat = a.view(-1)
    action = rng.random()
    if action < 0.4 and flat.numel():
        i = rng.randrange(flat.numel())
        info = torch.iinfo(a.dtype)
        flat[i] = rng.choice([0, 1, info.max, info.min, int(flat[max(i - 1, 0)]), int(flat[i]) + 1])
    elif action < 0.7:
        a = a[: rng.randrange(a.numel() + 1)].clone()  # shortened
    elif action < 0.85:
        a = torch.cat([a, a[:3]])  # lengthened
    else:
        a = a.to(rng.choice([torch.int32, torch.int64, torch.uint8, torch.float32]))
    arrays[key] = a


def _outcome(path, tensors, monkeypatch) -> str:
    real_zeros = torch.zeros

    def guarded(*size, **kw):
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        n = 1
        for d in dims:
            n *= int(d)
        assert n <= MAX_ALLOC, f"an allocation of {n} elements from a {path.stat().st_size}-byte file"
        return real_zeros(*size, **kw)

    monkeypatch.setattr(torch, "zeros", guarded)
    try:
        loaded = bs.load(path, model=Holder({k: torch.zeros_like(v) for k, v in tensors.items()}))
    except BrainsurgeonError as e:
        assert "\n" not in str(e).strip(), "errors are one line"
        return "refused"
    finally:
        monkeypatch.setattr(torch, "zeros", real_zeros)
    same = all(torch.equal(getattr(loaded, k), v) for k, v in tensors.items())
    return "identical" if same else "different"


def test_fuzz_header_mutations_with_valid_checksum(valid, tmp_path, monkeypatch):
    """A crafted header (checksum recomputed) is validated field by field: identical weights or refused."""
    tensors, meta, arrays, _ = valid
    rng = random.Random(SEED)
    seen = {"refused": 0, "identical": 0}
    for i in range(200):
        table = json.loads(meta[storage.TENSORS_KEY])
        for _ in range(rng.choice([1, 1, 2])):
            _mutate_header(rng, table)
        m = dict(meta, **{storage.TENSORS_KEY: json.dumps(table)})
        m[storage.CHECKSUM_KEY] = storage._checksum(arrays, m)
        path = tmp_path / f"h{i}.safetensors"
        save_file(arrays, str(path), metadata=m)
        outcome = _outcome(path, tensors, monkeypatch)
        assert outcome != "different", f"variant {i}: {table}"
        seen[outcome] += 1
    assert seen["refused"] > 150  # most mutations break the file; the rest touch nothing decoded


def test_fuzz_array_mutations_with_valid_checksum(valid, tmp_path, monkeypatch):
    """Crafted index arrays: refused or decoded (a crafted file may hold other weights), never a crash."""
    tensors, meta, arrays, _ = valid
    rng = random.Random(SEED + 1)
    seen = {"refused": 0, "identical": 0, "different": 0}
    for i in range(150):
        changed = dict(arrays)
        _mutate_arrays(rng, changed)
        m = dict(meta)
        m[storage.CHECKSUM_KEY] = storage._checksum(changed, m)
        path = tmp_path / f"a{i}.safetensors"
        save_file(changed, str(path), metadata=m)
        seen[_outcome(path, tensors, monkeypatch)] += 1
    assert seen["refused"] > 75, seen


def test_fuzz_damaged_bytes_are_refused(valid, tmp_path, monkeypatch):
    """Flipped bytes and truncations anywhere (no checksum fix-up): refused, or identical if harmless."""
    tensors, _, _, raw = valid
    rng = random.Random(SEED + 2)
    for i in range(100):
        data = bytearray(raw)
        if i % 4 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"b{i}.safetensors"
        path.write_bytes(bytes(data))
        assert _outcome(path, tensors, monkeypatch) != "different", f"variant {i}"


def test_formats_decode_raises_only_brainsurgeon_errors():
    """Direct decoder calls with hostile facts (the loader's last line of defence)."""
    t = torch.zeros(4, 8)
    t[:, ::4] = 1.0
    good = formats.encode_nm(t, 1, 4)
    for info in ({"n": 1, "m": 0, "bits": 2}, {"n": 1, "m": 4, "bits": 0}, {"m": 4, "bits": 2}, {"n": 9, "m": 4, "bits": 2},
                 {"n": 1, "m": 4.5, "bits": 2}, {"n": 1, "m": 4, "bits": 8}):
        with pytest.raises(BrainsurgeonError):
            formats.decode(formats.Encoded("nm", (4, 8), torch.float32, dict(good.parts), info))
    d = formats.encode_delta(t, 4)
    for info in ({"bits": 0, "entries": d.info["entries"]}, {"bits": 3, "entries": d.info["entries"]},
                 {"bits": 4}, {"bits": 4, "entries": -1}, {"bits": 4, "entries": "8"}):
        with pytest.raises(BrainsurgeonError):
            formats.decode(formats.Encoded("delta", (4, 8), torch.float32, dict(d.parts), info))


def test_fuzz_hf_directory_index(tmp_path, monkeypatch):
    """The sparse HF directory's index, edited with its checksum recomputed: identical model or refused."""
    transformers = pytest.importorskip("transformers")
    import shutil

    from brainsurgeon.sparse import hf_dir

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::3] = 0
    bs.save(model, tmp_path / "valid")
    index = json.loads((tmp_path / "valid" / hf_dir.INDEX_FILE).read_text())
    ref = model.state_dict()
    rng = random.Random(SEED + 3)
    names = sorted(index["weight_map"])
    for i in range(60):
        d = tmp_path / f"v{i}"
        shutil.copytree(tmp_path / "valid", d)
        changed = json.loads(json.dumps(index))
        action = rng.randrange(7)
        if action == 0:
            changed["weight_map"].pop(rng.choice(names))
        elif action == 1:
            changed["weight_map"][rng.choice(names)] = rng.choice(["../x", "model.sparse.safetensors", 3])
        elif action == 2:
            changed["aliases"] = rng.choice([{}, {"lm_head.weight": "nope"}, {"x": names[0]}, [], None])
        elif action == 3:
            changed["shards"] = {rng.choice(["../../etc/passwd", "a.safetensors", next(iter(index["shards"]))]): "0" * 64}
        elif action == 4:
            changed[rng.choice(["format_version", "format", "config_sha256", "weight_map"])] = rng.choice(VALUES)
        elif action == 5:
            changed.pop(rng.choice(sorted(changed)))
        else:
            changed["weight_map"][f"extra.{i}"] = next(iter(index["shards"]))
        changed["checksum"] = hf_dir._index_checksum(changed)
        (d / hf_dir.INDEX_FILE).write_text(json.dumps(changed))
        try:
            loaded = bs.load(d)
        except BrainsurgeonError as e:
            assert "\n" not in str(e).strip()
            continue
        assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items()), f"variant {i}: {changed}"
