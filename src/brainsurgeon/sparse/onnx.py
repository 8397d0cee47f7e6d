"""Export a pruned model to ONNX and check it with onnxruntime (outputs and latency beside PyTorch's).

The exported graph is dense: ONNX's standard operators have no sparse matrix product that
onnxruntime runs faster, so element-wise pruning shows up in ONNX only as smaller compressed
files; structurally pruned (compact) models are smaller dense graphs and run faster everywhere.
Sparse modules (from ``to_sparse``) are turned back into dense layers first.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BrainsurgeonError
from ..io import atomic_path
from .modules import SparseConv2d, SparseLinear

ONNX_RTOL = 1e-4  # float32 kernels of two runtimes: different summation orders


def to_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every sparse module replaced by the dense layer it came from."""
    work = copy.deepcopy(model)
    if isinstance(work, (SparseLinear, SparseConv2d)):
        return work.to_dense_layer()
    for name, module in list(work.named_modules()):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, attr, module.to_dense_layer())
    return work


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, opset: int = 18,
                repeats: int = 20) -> dict:
    """Write ``model`` as ONNX (batch dimension dynamic), then run it in onnxruntime on ``example_input``.

    Returns the file size, the largest output difference against PyTorch (relative to the largest
    output) and both runtimes' median latency in ms. Raises ``BrainsurgeonError`` if they disagree.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BrainsurgeonError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'brainsurgeon[onnx]'") from e
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise BrainsurgeonError("example_input must be a tensor with a batch dimension, e.g. torch.rand(1, 1, 28, 28)")
    dense = to_dense(model).eval().float()
    x = example_input.float()
    with torch.no_grad():
        try:
            ref = dense(x)
        except Exception as e:
            raise BrainsurgeonError(f"the example input {tuple(x.shape)} does not run through the model ({e}); "
                                    "give the input shape the model takes") from e
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with atomic_path(Path(path)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        onnx_path = tmp.with_suffix(".onnx")
        try:
            torch.onnx.export(dense, (x,), str(onnx_path), dynamo=True, opset_version=opset, external_data=False,
                              input_names=["input"], output_names=["output"], dynamic_shapes=({0: batch},),
                              verbose=False)
        except Exception as e:
            raise BrainsurgeonError(f"torch.onnx.export could not export this model: {e}") from e
        onnx_path.replace(tmp)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    out = session.run(None, feed)[0]
    diff = float(np.abs(out - ref.numpy()).max())
    scale = float(np.abs(ref.numpy()).max()) or 1.0
    if diff > ONNX_RTOL * scale:
        raise BrainsurgeonError(f"onnxruntime's output differs from PyTorch's by {diff:.3g} (scale {scale:.3g})")
    with torch.no_grad():
        torch_ms = _median_ms(lambda: dense(x), repeats)
    return {
        "path": str(path), "bytes": Path(path).stat().st_size, "opset": opset, "input_shape": list(x.shape),
        "max_abs_diff": diff, "max_rel_diff": diff / scale,
        "torch_ms": torch_ms, "onnxruntime_ms": _median_ms(lambda: session.run(None, feed), repeats),
    }
