"""Export a pruned model to ONNX and check it with onnxruntime (outputs and latency beside PyTorch's).

The exported graph is dense: ONNX's standard operators have no sparse matrix product that
onnxruntime runs faster, so element-wise pruning shows up in ONNX only as smaller compressed
files; structurally pruned (compact) models are smaller dense graphs and run faster everywhere.
Sparse modules (from ``to_sparse``) are turned back into dense layers first.
"""
from __future__ import annotations

import copy
import inspect
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


# ----------------------------------------------------------------------------- transformers causal LMs
class _CausalStep(nn.Module):
    """One call of a causal LM with its KV cache as plain tensors: the graph ``export_hf_onnx`` writes.

    Inputs ``input_ids`` (1 x q), ``position_ids`` (1 x q) and per layer ``past_k_i``, ``past_v_i``
    (1 x kv_heads x p x head_dim; p may be 0: then the call is a prefill); outputs ``logits``
    (1 x q x vocab) and ``present_k_i``, ``present_v_i`` (p + q positions).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        key = cache_argument(self.model)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{key: cache})
        present = []
        for layer in getattr(out, key).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_argument(model: nn.Module) -> str:
    """The name of ``model.forward``'s KV-cache argument and output field: transformers >= 5.2x says
    "cache", earlier versions "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(kv heads, head dim) of each layer's cache, read off a one-token forward.

    Not from the config: a model whose heads were pruned (``structure="channel"``) keeps a different
    number of kv heads in each layer, and the config's one number fits none of them.
    """
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in getattr(out, cache_argument(model)).layers]


class OrtCausalLM:
    """Greedy decoding with onnxruntime on a graph from :func:`export_hf_onnx` (batch 1, KV cache)."""

    def __init__(self, path: str | Path, config, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        # each past's (1, kv heads, past, head dim) as the graph declares it: per layer, pruned heads included
        self.past_shapes = [(1, i.shape[1], 0, i.shape[3]) for i in inputs[2:]]

    def step(self, ids: np.ndarray, start: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        pos = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        out = self.session.run(None, dict(zip(self.names, [ids.astype(np.int64), pos, *past])))
        return out[0], out[1:]

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros(shape, np.float32) for shape in self.past_shapes]

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
        """The prompt followed by ``new_tokens`` greedy tokens, and each decode step's seconds."""
        logits, past = self.step(prompt.numpy(), 0, self.empty_past())
        tokens, times = [int(logits[0, -1].argmax())], []
        for i in range(new_tokens - 1):
            t0 = time.perf_counter()
            logits, past = self.step(np.array([[tokens[-1]]]), prompt.shape[1] + i, past)
            times.append(time.perf_counter() - t0)
            tokens.append(int(logits[0, -1].argmax()))
        return torch.cat([prompt, torch.tensor([tokens])], dim=1), times


def export_hf_onnx(model: nn.Module, path: str | Path, *, prompt_tokens: int = 8, opset: int = 17) -> dict:
    """Export a transformers causal LM (sparse modules made dense) as one step with its KV cache.

    The graph serves prefill (empty past) and decode (one token). It is checked against PyTorch on
    the same inputs, a prefill of ``prompt_tokens`` and one decode step after it: logits must agree to
    1e-4 of the largest. Uses the TorchScript exporter (``dynamo=False``): torch.export cannot trace
    transformers' cache object here.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BrainsurgeonError("ONNX export needs onnx and onnxruntime: pip install 'brainsurgeon[onnx]'") from e
    config = model.config
    if not getattr(config, "num_hidden_layers", None) or not hasattr(model, "generate"):
        raise BrainsurgeonError(f"{type(model).__name__} is not a causal language model: ONNX export of "
                                "transformers models covers causal LMs (decoder with a KV cache)")
    step = _CausalStep(to_dense(model).eval().float())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, prompt_tokens + 1), generator=g)
    empty = [torch.zeros(1, kv_heads, 0, head_dim) for kv_heads, head_dim in _kv_shapes(step.model) for _ in "kv"]
    names = [f"past_{k}_{i}" for i in range(step.layers) for k in ("k", "v")]
    with torch.no_grad():
        prefill = step(ids[:, :prompt_tokens], torch.arange(prompt_tokens)[None], *empty)
        past = list(prefill[1:])
        # traced on a 2-token step after a cache, so the causal mask is built by graph ops (any q, any p)
        example = (ids[:, prompt_tokens - 1:prompt_tokens + 1], torch.arange(prompt_tokens - 1, prompt_tokens + 1)[None],
                   *[t[:, :, :prompt_tokens - 1] for t in past])
        decode = step(ids[:, prompt_tokens:], torch.tensor([[prompt_tokens]]), *past)
    dynamic = {"input_ids": {1: "tokens"}, "position_ids": {1: "tokens"}, **{n: {2: "past"} for n in names}}
    with atomic_path(Path(path)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(step, example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=["input_ids", "position_ids", *names],
                              output_names=["logits", *[n.replace("past", "present") for n in names]],
                              dynamic_axes=dynamic)
        except Exception as e:
            raise BrainsurgeonError(f"torch.onnx.export could not export this model: {str(e).splitlines()[0][:300]}") from e
    ort_lm = OrtCausalLM(path, config)
    diffs = {}
    for phase, (q_ids, start, p, ref) in {"prefill": (ids[:, :prompt_tokens], 0, ort_lm.empty_past(), prefill),
                                         "decode": (ids[:, prompt_tokens:], prompt_tokens, [t.numpy() for t in past], decode)}.items():
        logits, _ = ort_lm.step(q_ids.numpy(), start, p)
        diff, scale = float(np.abs(logits - ref[0].numpy()).max()), float(ref[0].abs().max()) or 1.0
        if diff > ONNX_RTOL * scale:
            raise BrainsurgeonError(f"onnxruntime's {phase} logits differ from PyTorch's by {diff:.3g} (scale {scale:.3g})")
        diffs[phase] = diff
    return {"path": str(path), "bytes": Path(path).stat().st_size, "opset": opset, "inputs": ["input_ids", "position_ids", *names],
            "max_abs_diff": max(diffs.values()), "max_abs_diff_per_phase": diffs,
            "max_rel_diff": max(diffs.values()) / (float(prefill[0].abs().max()) or 1.0)}
