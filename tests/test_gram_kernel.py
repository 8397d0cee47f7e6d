"""The AMX Gram kernel (bfloat16 rows, float32 tiles, float64 sums) against the exact float64 product."""
from __future__ import annotations

import ctypes

import pytest
import torch

from brainsurgeon import cbuild
from brainsurgeon.curvature import gram_kernel
from brainsurgeon.curvature.layer_inputs import _Accumulator

needs_amx = pytest.mark.skipif(not gram_kernel.available(), reason=f"AMX Gram kernel: {gram_kernel.why_not()}")


def bf16_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 3  # columns of different scales
    return x.to(torch.bfloat16)


@needs_amx
@pytest.mark.parametrize("n,d", [(1, 1), (33, 17), (64, 32), (531, 577), (1030, 64), (700, 1536)])
def test_matches_the_float64_product(n, d):
    """Tails in both dimensions, several chunks of tokens; added onto what acc held, exactly symmetric."""
    x = bf16_rows(n, d)
    start = torch.randn(d, d, dtype=torch.float64)
    start = start + start.T
    acc = start.clone()
    gram_kernel.add_gram_bf16(acc, x)
    exact = x.double().T @ x.double()
    # float32 accumulation over n products: relative 1e-6 of the largest entry at these sizes
    assert (acc - start - exact).abs().max() <= 2e-6 * exact.abs().max()
    assert torch.equal(acc, acc.T)


@needs_amx
def test_empty_rows_add_nothing():
    acc = torch.ones(5, 5, dtype=torch.float64)
    gram_kernel.add_gram_bf16(acc, torch.empty(0, 5, dtype=torch.bfloat16))
    assert torch.equal(acc, torch.ones(5, 5, dtype=torch.float64))


@needs_amx
def test_threads_do_not_change_the_sums():
    """Each 32 x 32 block is one thread's, over the tokens in order: the sums do not depend on the count."""
    x = bf16_rows(1500, 300, seed=1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            acc = torch.zeros(300, 300, dtype=torch.float64)
            gram_kernel.add_gram_bf16(acc, x)
            results.append(acc)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


@needs_amx
def test_the_accumulator_keeps_bfloat16_rows_for_the_kernel(monkeypatch):
    """bfloat16 batches of a layer go to the kernel as they are; H matches the float32 path's."""
    calls = []
    real = gram_kernel.add_gram_bf16
    monkeypatch.setattr(gram_kernel, "add_gram_bf16", lambda acc, x: (calls.append(x.dtype), real(acc, x)))
    batches = [bf16_rows(n, 96, seed=s) for s, n in enumerate((40, 512, 3000, 7))]
    fast, slow = _Accumulator(96, torch.device("cpu"), True), _Accumulator(96, torch.device("cpu"), True)
    for b in batches:
        fast.add(b)
        slow.add(b.float())
    fast._flush(), slow._flush()
    assert calls and set(calls) == {torch.bfloat16}
    assert fast.rows == slow.rows == 3559
    assert (fast.xtx - slow.xtx).abs().max() <= 1e-6 * slow.xtx.abs().max()


def test_without_the_kernel_bfloat16_rows_take_the_float32_path(monkeypatch):
    """No AMX (or no compiler): the rows are converted and multiplied by torch, the same sums."""
    monkeypatch.setattr(gram_kernel, "available", lambda: False)
    monkeypatch.setattr(gram_kernel, "add_gram_bf16", lambda *a: pytest.fail("the kernel must not be called"))
    x = bf16_rows(300, 40)
    acc = _Accumulator(40, torch.device("cpu"), True)
    acc.add(x)
    acc._flush()
    exact = x.double().T @ x.double()
    assert (acc.xtx - exact).abs().max() <= 1e-6 * exact.abs().max()


def test_error_correction_rows_take_the_float32_path(monkeypatch):
    """With the cross term (dense reference rows) both products stay in float32, whatever the CPU."""
    monkeypatch.setattr(gram_kernel, "add_gram_bf16", lambda *a: pytest.fail("the kernel must not be called"))
    x, ref = bf16_rows(200, 24), bf16_rows(200, 24, seed=3)
    acc = _Accumulator(24, torch.device("cpu"), True, with_cross=True)
    acc.add(x, ref)
    acc._flush()
    assert torch.allclose(acc.xtx, x.double().T @ x.double(), rtol=1e-6, atol=1e-4)


def test_a_build_without_amx_says_so(tmp_path):
    """Built with generic flags (no -march=native), the library reports no AMX and refuses to run."""
    cc = cbuild.compiler()
    assert cc is not None, "a C compiler is needed for the kernels"
    target = tmp_path / "gram-portable.so"
    cbuild.build(gram_kernel.SOURCE, cc, cbuild.openmp_runtime(), target, ["-O2", "-fPIC", "-std=gnu11"])
    lib = ctypes.CDLL(str(target))
    lib.gram_amx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_int]
    assert lib.gram_amx_available() == 0
    assert lib.gram_amx(None, None, 0, 0, None, 1) == -1


def test_the_kernel_refuses_wrong_operands():
    if not gram_kernel.available():
        with pytest.raises(RuntimeError, match="not available"):
            gram_kernel.add_gram_bf16(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bfloat16))
        return
    with pytest.raises(ValueError, match="float64"):
        gram_kernel.add_gram_bf16(torch.zeros(3, 3), torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        gram_kernel.add_gram_bf16(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3))
