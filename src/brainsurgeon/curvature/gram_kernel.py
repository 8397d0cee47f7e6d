"""X^T X of bfloat16 rows with float32 products on AMX (``csrc/gram.c``), summed into float64.

Why a C kernel: with ``compute_dtype="bfloat16"`` the calibration forwards run in bfloat16 and the
layer inputs X arrive in bfloat16. torch's bfloat16 matmul rounds X^T X to bfloat16 (8 bits), so the
rows were converted to float32 and multiplied by SGEMM, and that product became the largest cost of a
bfloat16 calibration (40 of 96 s for sparsegpt on SmolLM2-135M, 128 x 512 tokens, 2 threads). torch
has no CPU matmul with bfloat16 inputs and a float32 result (``out_dtype`` is CUDA-only in 2.13).
AMX's TDPBF16PS forms the same exact products and accumulates them in float32 tiles. Measured, 2
threads, against the float32 path (conversion + :func:`~brainsurgeon.curvature.layer_inputs.add_gram`):
4096 x 576 rows 1.8 ms against 7.3 ms; 10922 x 1536 (SmolLM2's down_proj) 28 ms against 121 ms; the
result agrees with the float64 product to the float32 path's accuracy (relative 1e-6).

Used only where the CPU has AMX-BF16 and Linux grants the tile state; elsewhere :func:`available`
says why not and the rows take the float32 path (the same sums, computed by torch).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import cbuild

SOURCE = Path(__file__).with_name("csrc") / "gram.c"

def _requires() -> str | None:
    return None if " amx_bf16" in cbuild.cpu_flags() + " " else "this CPU has no AMX-BF16"


def _prepare(lib: ctypes.CDLL) -> str | None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gram_amx.argtypes = [p, p, i64, i64, p, i32]
    lib.gram_amx.restype = i32
    lib.gram_amx_work_bytes.argtypes = [i64]
    lib.gram_amx_work_bytes.restype = i64
    lib.gram_amx_available.restype = i32
    if not lib.gram_amx_available():
        return "the AMX path was not compiled, or Linux refused the tile state (arch_prctl XTILEDATA)"
    return None


KERNEL = cbuild.Kernel(SOURCE, _prepare, _requires)


def available() -> bool:
    return KERNEL.available()


def why_not() -> str | None:
    """Why the kernel is not used here (None when it is)."""
    return KERNEL.why_not()


def add_gram_bf16(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += X^T X``: acc float64 (d x d, contiguous, CPU), X bfloat16 (n x d, CPU); exactly symmetric."""
    lib = KERNEL.lib()
    if lib is None:
        raise RuntimeError(f"the AMX Gram kernel is not available: {KERNEL.why_not()}")
    n, d = x.shape
    if acc.dtype != torch.float64 or acc.shape != (d, d) or not acc.is_contiguous() or acc.device.type != "cpu":
        raise ValueError(f"acc must be a contiguous float64 CPU tensor of shape ({d}, {d})")
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError("X must be a bfloat16 CPU tensor")
    x = x.contiguous()
    work = torch.empty(lib.gram_amx_work_bytes(d) // 4 + 16, dtype=torch.float32)
    offset = (-work.data_ptr()) % 64  # 64-byte aligned scratch (tile rows)
    lib.gram_amx(acc.data_ptr(), x.data_ptr(), n, d, work.data_ptr() + offset, torch.get_num_threads())
