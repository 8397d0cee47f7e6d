"""ONNX export of pruned models: onnxruntime's outputs match PyTorch's; latency reported for both."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.models import LeNet5
from brainsurgeon.sparse.onnx import export_onnx, to_dense

# the ONNX extra is optional: without it these tests are skipped, not a collection error for the suite
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def pruned_lenet5(sparsity=0.9):
    torch.manual_seed(0)
    model = LeNet5((1, 28, 28)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model


def test_sparse_model_exports_and_onnxruntime_matches(tmp_path):
    model = pruned_lenet5()
    sparse = bs.to_sparse(model, engine="numba_csr")  # exported via its dense equivalent
    report = export_onnx(sparse, tmp_path / "m.onnx", torch.rand(2, 1, 28, 28))
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert report["max_rel_diff"] <= 1e-4 and report["torch_ms"] > 0 and report["onnxruntime_ms"] > 0
    # the batch dimension is dynamic, and the graph computes the pruned model, independently checked here
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 1, 28, 28)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # the zeros of the pruned weights are in the graph's initializers
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert any(a.ndim >= 2 and (a == 0).mean() > 0.85 for a in inits.values())


def test_to_dense_inverts_to_sparse():
    model = pruned_lenet5(0.8)
    back = to_dense(bs.to_sparse(model, engine="torch_csr"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_bad_example_input(tmp_path):
    with pytest.raises(BrainsurgeonError, match="does not run through the model"):
        export_onnx(pruned_lenet5(), tmp_path / "m.onnx", torch.rand(1, 3, 5))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_onnx_reports_both_latencies(tmp_path):
    from typer.testing import CliRunner

    import brainsurgeon.cli.export  # noqa: F401  (registers the command)
    from brainsurgeon.cli import app

    model = pruned_lenet5()
    bs.save(model, tmp_path / "p.safetensors", spec={"arch": "lenet5", "kwargs": {"input_shape": [1, 28, 28]}})
    result = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "p.safetensors"), "--format", "onnx",
                                      "--out", str(tmp_path / "m.onnx"), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches PyTorch" in result.output and "onnxruntime" in result.output.splitlines()[-1]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)
