"""The C bitmask kernels (sparse/csrc/bitmask.c): layout, products against float64, the build, threads."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.sparse import SparseLinear, native
from brainsurgeon.sparse.kernels import CSR, bitmask_from_csr, get_engine, stack_bitmasks

ENGINES = ("bitmask", "bitmask_serial")


def weight(rows, cols, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0.0
    return w


def reference(w, xt):
    return (w.double() @ xt.double()).float()


def close(y, ref):
    return float((y - ref).abs().max()) <= 2e-5 * (1.0 + float(ref.abs().max()))


def test_layout_holds_every_nonzero_in_order():
    w = weight(5, 37, 0.6)
    w[2] = 0.0  # an empty row
    state = bitmask_from_csr(CSR.from_dense(w))
    assert state.masks.shape == (5, 3) and state.masks.dtype == np.uint16
    rebuilt = torch.zeros(5, 48)
    for i in range(5):
        cols = [16 * c + b for c in range(3) for b in range(16) if int(state.masks[i, c]) >> b & 1]
        rebuilt[i, cols] = torch.from_numpy(state.values[state.rowptr[i]:state.rowptr[i + 1]])
    assert torch.equal(rebuilt[:, :37], w) and not rebuilt[:, 37:].any()


def test_layout_sorts_a_csr_given_out_of_column_order():
    w = weight(4, 20, 0.5)
    csr = CSR.from_dense(w)
    for i in range(4):  # reverse each row's entries
        a, b = int(csr.indptr[i]), int(csr.indptr[i + 1])
        csr.indices[a:b], csr.values[a:b] = csr.indices[a:b].flip(0).clone(), csr.values[a:b].flip(0).clone()
    xt = torch.randn(20, 1)
    assert close(get_engine("bitmask").apply(bitmask_from_csr(csr), xt), reference(w, xt))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 23), (5, 40), (9, 80), (64, 64), (96, 576), (33, 1536), (130, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_products_match_float64(engine, shape, sparsity):
    w = weight(*shape, sparsity, seed=shape[0])
    e = get_engine(engine)
    state = e.prepare(CSR.from_dense(w))
    for n in (1, 2, 127, 128, 129, 300):  # vector, register tile edges, several tiles
        xt = torch.randn(shape[1], n)
        assert close(e.apply(state, xt), reference(w, xt)), (shape, sparsity, n)


@pytest.mark.parametrize("engine", ENGINES)
def test_prefill_products_are_within_an_ulp_of_float64(engine):
    """Long rows: 64-column float32 blocks summed in float64. One float32 chain over the 2048 non-zeros
    of a row was off by tens of ulps (the error that put a 30-layer model's logits 4x further from
    float64 than dense torch's)."""
    g = torch.Generator().manual_seed(3)
    w = torch.rand(64, 4096, generator=g)
    w[torch.rand(64, 4096, generator=g) < 0.5] = 0.0
    xt = torch.rand(4096, 200, generator=g)  # positive terms: the sums grow, and a chain's error with them
    e = get_engine(engine)
    y, ref = e.apply(e.prepare(CSR.from_dense(w)), xt).double(), w.double() @ xt.double()
    ulp = torch.finfo(torch.float32).eps * ref.abs()
    assert float(((y - ref).abs() / ulp).max()) <= 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_decode_closure_keeps_its_arrays_alive(engine):
    """vector_fn's product holds the layout it reads: the state object may go (it once read freed memory)."""
    import gc

    w = weight(300, 200, 0.7)
    product = get_engine(engine).vector_fn(get_engine(engine).prepare(CSR.from_dense(w)))
    gc.collect()
    junk = [np.full(70_000, 7.0, dtype=np.float32) for _ in range(20)]  # reuse what was freed, if it was
    x = torch.randn(200)
    assert close(product(x), reference(w, x[:, None])[:, 0]) and len(junk) == 20


def test_prefill_output_is_contiguous():
    """Engines compute W @ x^T; the module hands back (rows, out) in row-major order, not a transposed view."""
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.6)
    y = SparseLinear(layer, "bitmask")(torch.randn(2, 30, 64))
    assert y.shape == (2, 30, 48) and y.is_contiguous()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cols", [23, 40, 576])
def test_stacked_weights_and_row_slices_give_the_parts_products(engine, cols):
    """A decode group's layout: parts stacked by rows, and each part read back as a slice, without a copy."""
    e = get_engine(engine)
    parts = [weight(rows, cols, s, seed=rows) for rows, s in ((12, 0.7), (5, 0.0), (9, 1.0), (20, 0.5))]
    states = [e.prepare(CSR.from_dense(w)) for w in parts]
    stacked = e.stack(states)
    assert stacked.rows == 46 and int(stacked.rowptr[-1]) == sum(int(s.rowptr[-1]) for s in states)
    xt = torch.randn(cols, 1)
    assert close(e.apply(stacked, xt), reference(torch.cat(parts), xt))
    start = 0
    for w in parts:
        view = e.row_slice(stacked, start, start + w.shape[0])
        assert np.shares_memory(view.values, stacked.values) and np.shares_memory(view.masks, stacked.masks)
        for n in (1, 130):
            x = torch.randn(cols, n)
            assert close(e.apply(view, x), reference(w, x))
        start += w.shape[0]
    with pytest.raises(ValueError, match="columns"):
        stack_bitmasks([states[0], e.prepare(CSR.from_dense(weight(3, cols + 16, 0.5)))])


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_fast_path_matches_dense_with_bias_and_leading_dims(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = nn.Linear(200, 96)
        with torch.no_grad():
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.7)
        sparse = SparseLinear(layer, "dense", decode_engine="bitmask")
        assert sparse._vector is not None
        with torch.no_grad():
            for x in (torch.randn(1, 1, 200), torch.randn(200), torch.randn(1, 400)[:, ::2]):  # last: strided
                assert sparse(x).shape == layer(x).shape
                assert close(sparse(x), layer(x))
            x = torch.randn(3, 200)  # more rows than one: not the vector path, same numbers
            assert close(sparse(x), layer(x))
    finally:
        torch.set_num_threads(before)


def test_to_sparse_times_the_bitmask_engines():
    layer = nn.Linear(576, 576, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.7)
    report = bs.to_sparse(nn.Sequential(layer), example_input=torch.randn(1, 576)).sparse_report["0"]
    assert {"bitmask", "bitmask_serial"} <= set(report["times_ms"])


# ----------------------------------------------------------------------------- the build
def _cpu_has(*features: str) -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return all(f" {f}" in flags for f in features)


def test_compiled_for_this_cpu():
    assert native.load() is not None, native.error()
    expected = "avx512" if _cpu_has("avx512f") else "avx2" if _cpu_has("avx2", "fma") else "scalar"
    assert native.isa() == expected


def test_kernels_share_torchs_openmp_runtime():
    """In a fresh process: after two-thread bitmask products the only OpenMP library loaded is torch's."""
    code = ("import torch; torch.set_num_threads(2)\n"
            "from brainsurgeon.sparse.kernels import CSR, get_engine\n"
            "from brainsurgeon.sparse import native\n"
            "e = get_engine('bitmask'); s = e.prepare(CSR.from_dense(torch.randn(256, 256)))\n"
            "e.apply(s, torch.randn(256, 1)); e.apply(s, torch.randn(256, 40))\n"
            "print(native.openmp_runtime())\n"
            "import json; print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps')\n"
            "                                      if 'omp' in l.split('/')[-1]})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    runtime, loaded = out[0], json.loads(out[1])
    assert runtime != "None" and loaded == [runtime]  # two runtimes would each keep a pool of spinning threads


BUILDS = [pytest.param(["-O2", "-fPIC", "-std=gnu11"], 0, id="portable-scalar")]
if _cpu_has("avx2", "fma", "popcnt"):  # on an AVX-512 machine too: the AVX2 path is built and run there
    BUILDS.append(pytest.param(["-O3", "-mavx2", "-mfma", "-mpopcnt", "-fPIC", "-std=gnu11"], 256, id="avx2"))


@pytest.mark.parametrize("cflags, isa", BUILDS)
def test_other_builds_give_the_same_products(tmp_path, cflags, isa):
    """The loops that run without AVX-512 (AVX2; baseline x86-64 / generic), built here with their flags."""
    cc = native._compiler()
    assert cc is not None, "a C compiler is needed for the bitmask engine"
    lib_path = tmp_path / "other.so"
    old = native.CFLAGS
    native.CFLAGS = cflags
    try:
        native._build(cc, native.openmp_runtime(), lib_path)
    finally:
        native.CFLAGS = old
    lib = ctypes.CDLL(str(lib_path))
    assert lib.bm_isa() == isa
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_spmv.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.bm_spmm.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    for rows, cols, sparsity in ((45, 77, 0.6), (40, 576, 0.0), (33, 1536, 0.7), (9, 16, 0.5), (5, 8, 1.0)):
        w = weight(rows, cols, sparsity, seed=cols)
        s = bitmask_from_csr(CSR.from_dense(w))
        x, xt = torch.randn(cols), torch.randn(cols, 131)
        y, yt = torch.empty(rows), torch.empty(rows, 131)
        lib.bm_spmv(*s.pointers, x.data_ptr(), y.data_ptr(), rows, s.nchunks, 2)
        lib.bm_spmm(*s.pointers, xt.data_ptr(), yt.data_ptr(), rows, s.nchunks, 131, 1)
        assert close(y, reference(w, x[:, None])[:, 0]) and close(yt, reference(w, xt)), (rows, cols, sparsity)


def _probe(env: dict) -> str:
    code = "from brainsurgeon.sparse import native; native.load(); print(native.error())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_without_a_compiler_the_engine_says_why(tmp_path):
    msg = _probe({"CC": str(tmp_path / "no-such-cc"), "BRAINSURGEON_CACHE": str(tmp_path)})
    assert "no C compiler" in msg and "set CC" in msg


def test_the_build_is_cached_and_not_repeated(tmp_path):
    log = tmp_path / "calls"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexec {native._compiler()} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"CC": str(wrapper), "BRAINSURGEON_CACHE": str(tmp_path / "cache")}
    assert _probe(env) == "None"
    built = [ln for ln in log.read_text().splitlines() if "--version" not in ln]
    assert len(built) == 2  # compile + link
    assert _probe(env) == "None"
    assert [ln for ln in log.read_text().splitlines() if "--version" not in ln] == built  # loaded from the cache
    libs = list((tmp_path / "cache" / "kernels").glob("bitmask-*.so"))
    assert len(libs) == 1 and not [p for p in (tmp_path / "cache" / "kernels").iterdir() if p.is_dir()]
