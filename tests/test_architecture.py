"""Specs of pruned models: compact and EigenDamage models save and rebuild from their spec."""
import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.architecture import construct, describe, spec_of
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.io import load_model, read_spec, save_weights
from brainsurgeon.models import build_model, make_spec

from conftest import cli_trained_lenet300


def _data(shape=(1, 8, 8), n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize(
    "arch,method,kw",
    [("lenet300", "l1-norm", {}), ("resnet", "l1-norm", {}), ("lenet5", "eigendamage", {"allocation": "global"})],
)
def test_pruned_model_rebuilds_from_its_spec(tmp_path, arch, method, kw):
    spec = make_spec(arch, input_shape=(1, 8, 8), num_classes=10)
    model = build_model(spec).eval()
    model.brainsurgeon_spec = spec
    x, y = _data()
    res = bs.prune(model, (x, y), method, 0.5, structure="channel", **kw)
    new_spec = res.model.brainsurgeon_spec
    assert new_spec["modules"], "the compact model's changed layers are recorded"
    assert model.brainsurgeon_spec == spec  # the input's spec is not touched
    save_weights(res.model, tmp_path / "m.safetensors", new_spec)
    loaded = load_model(tmp_path / "m.safetensors").eval()
    res.model.eval()
    torch.testing.assert_close(loaded(x), res.model(x))


def test_unchanged_model_records_nothing():
    spec = make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10)
    assert "modules" not in spec_of(build_model(spec), spec)


def test_describe_construct_round_trip():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.BatchNorm2d(5))
    again = construct(describe(m))
    assert describe(again) == describe(m)


def test_bad_descriptions_are_clear_errors():
    with pytest.raises(BrainsurgeonError, match="unknown module description"):
        construct({"type": "LSTM"})
    spec = make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(BrainsurgeonError, match="does not have"):
        build_model({**spec, "modules": {"nope.x": {"type": "ReLU"}}})


def test_cli_structured_prune_then_evaluate(tmp_path):
    runner, app, weights = cli_trained_lenet300(tmp_path)
    out = tmp_path / "pruned"
    r = runner.invoke(app, ["prune", "--model", str(weights), "--data", "digits", "--method", "l1-norm", "--sparsity",
                            "0.5", "--structure", "channel", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert read_spec(out / "model.safetensors")["modules"]["net.1"]["out_features"] == 150
    r = runner.invoke(app, ["evaluate", "--model", str(out / "model.safetensors"), "--data", "digits"])
    assert r.exit_code == 0, r.output
