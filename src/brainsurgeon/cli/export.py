"""``brainsurgeon export``: write a (pruned) model sparse, dense, or as ONNX checked by onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ..errors import BrainsurgeonError
from ..outputs import check_output, reported_writes
from . import app
from .core import _handle_errors

EXPORT_FORMATS = ("sparse", "dense", "onnx")


def _input_shape(model, text: str | None) -> tuple[int, ...]:
    """``--input-shape 1,28,28``, else the spec's ``input_shape``, else the reference models' default."""
    if text is not None:
        try:
            shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise BrainsurgeonError(f"--input-shape {text!r} must be positive integers without the batch, e.g. 1,28,28")
        return shape
    spec = getattr(model, "brainsurgeon_spec", None) or {}
    shape = (spec.get("kwargs") or {}).get("input_shape")
    if shape is None and "arch" in spec:
        shape = (1, 28, 28)
    if shape is None:
        raise BrainsurgeonError("the model's input shape is unknown: give --input-shape, e.g. --input-shape 1,28,28")
    return tuple(int(s) for s in shape)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("export")
@_handle_errors
def export(
    model: Annotated[Path, typer.Option("--model", help="weights (.safetensors with an architecture spec, or a brainsurgeon sparse file), or a Hugging Face directory")],
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    format: Annotated[str, typer.Option("--format", help="sparse | dense | onnx")] = "sparse",
    force: Annotated[bool, typer.Option("--force", help="overwrite --out if it exists")] = False,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="ONNX: input shape without the batch, e.g. 1,28,28")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="ONNX: batch of the check and latency run")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Store a pruned model compactly (CSR / delta-coded / packed N:M in safetensors), dense, or as ONNX."""
    from .. import sparse

    if format not in EXPORT_FORMATS:
        raise BrainsurgeonError(f"--format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if batch_size < 1:
        raise BrainsurgeonError(f"--batch-size must be >= 1, got {batch_size}")
    if model.is_dir():  # a Hugging Face directory (sparse, from bs.save, or plain save_pretrained)
        from ..sparse.hf_dir import export_directory

        report, lines = export_directory(model, out, format, force)
        typer.echo(json.dumps(report, indent=2, default=str) if json_out else "\n".join(lines))
        return
    check_output(out, force=force, inputs=[model])  # never the input; writable; --force to replace
    net = sparse.load(model)
    if format == "onnx":
        from ..sparse.onnx import export_onnx

        shape = _input_shape(net, input_shape)
        x = torch.rand(batch_size, *shape, generator=torch.Generator().manual_seed(0))
        with reported_writes(out):
            report = export_onnx(net, out, x)
        lines = [f"wrote {out} (ONNX opset {report['opset']}, {_human(report['bytes'])})",
                 f"onnxruntime matches PyTorch: max |diff| {report['max_abs_diff']:.2e} "
                 f"({report['max_rel_diff']:.1e} of the largest output)",
                 f"latency at batch {batch_size}: PyTorch {report['torch_ms']:.3f} ms, "
                 f"onnxruntime {report['onnxruntime_ms']:.3f} ms (medians)"]
    else:
        with reported_writes(out):
            report = sparse.save(net, out, format=format)
        counts: dict[str, int] = {}
        for enc in report["encodings"].values():
            counts[enc] = counts.get(enc, 0) + 1
        lines = [f"wrote {out} ({format}, {_human(report['bytes'])}; dense float32 {_human(report['dense_float32_bytes'])}, "
                 f"{100 * report['ratio_to_dense']:.1f}%)",
                 f"{report['nonzeros']} non-zeros, {report['bytes_per_nonzero']:.2f} bytes per non-zero",
                 "tensors: " + ", ".join(f"{n} {enc}" for enc, n in sorted(counts.items()))]
    typer.echo(json.dumps(report, indent=2) if json_out else "\n".join(lines))
