"""The command line end to end on digits with tiny settings (typer's CliRunner, in process)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import brainsurgeon as bs
import brainsurgeon.cli.core as core  # registers the commands on the app
from brainsurgeon.cli import app
from brainsurgeon.data import load_digits
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.io import load_model, read_spec
from brainsurgeon.targets import find_targets

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_input(result, *fragments: str) -> None:
    """Exit code 2, a one-line message naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for f in fragments:
        assert f in result.output, result.output


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """LeNet-300-100 trained for one epoch on digits through `brainsurgeon train`."""
    path = tmp_path_factory.mktemp("train") / "lenet.safetensors"
    result = invoke("train", "--arch", "lenet300", "--data", "digits", "--epochs", "1", "--lr", "0.01", "--out", path)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    return path


def test_methods_lists_every_registered_method():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    for name in bs.methods():
        assert name in result.output
    assert "N:M" in result.output


def test_train_writes_weights_with_spec_and_reports_accuracy(trained):
    spec = read_spec(trained)
    assert spec == {"arch": "lenet300", "kwargs": {"input_shape": [1, 8, 8], "num_classes": 10}}
    model = load_model(trained)
    acc = evaluate(model, load_digits().test)["accuracy"]
    assert acc > 0.5  # one epoch at lr 0.01 learns digits well above chance (0.1)


def test_train_refuses_existing_out_and_bad_arch(trained, tmp_path):
    before = trained.read_bytes()
    assert_bad_input(invoke("train", "--epochs", "1", "--out", trained), "exists", "--force")
    assert trained.read_bytes() == before
    assert_bad_input(invoke("train", "--arch", "vgg", "--epochs", "1", "--out", tmp_path / "v.safetensors"), "vgg")
    assert_bad_input(invoke("train", "--epochs", "1", "--out", tmp_path / "v.pt"), ".safetensors")
    assert not (tmp_path / "v.safetensors").exists()


def test_prune_writes_model_and_report(trained, tmp_path):
    out = tmp_path / "pruned"
    result = invoke(
        "prune", "--model", trained, "--data", "digits", "--method", "magnitude", "--sparsity", "0.8",
        "--num-samples", "64", "--out", out,
    )
    assert result.exit_code == 0, result.output
    assert "achieved sparsity" in result.output and "before" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json"]

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "magnitude"
    assert report["overall"]["target_sparsity"] == 0.8
    assert report["overall"]["achieved_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert report["options"]["num_samples"] == 64
    pruned = load_model(out / "model.safetensors")
    assert read_spec(out / "model.safetensors") == read_spec(trained)
    test = load_digits().test
    ev = report["evaluation"]
    assert ev["samples"] == len(test[0])
    assert ev["accuracy_before"] == pytest.approx(evaluate(load_model(trained), test)["accuracy"])
    assert ev["accuracy_after"] == pytest.approx(evaluate(pruned, test)["accuracy"])
    for t in find_targets(pruned):
        rep = report["layers"][t.name]
        assert rep["achieved_sparsity"] == pytest.approx(float((t.weight == 0).float().mean()))
        assert rep["pruned"] == round(0.8 * t.weight.numel())

    # evaluate reads the pruned file and agrees with the report
    result = invoke("evaluate", "--model", out / "model.safetensors", "--data", "digits", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["accuracy"] == pytest.approx(ev["accuracy_after"])
    assert metrics["loss"] == pytest.approx(ev["loss_after"], rel=1e-5)
    assert metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)
    text = invoke("evaluate", "--model", out / "model.safetensors")
    assert text.exit_code == 0 and "accuracy" in text.output and "zero" in text.output


def test_prune_options_layers_structure_and_global(trained, tmp_path):
    out = tmp_path / "nm"
    result = invoke(
        "prune", "--model", trained, "--data", "digits", "--method", "magnitude", "--structure", "2:4",
        "--exclude", "net.5", "--num-samples", "32", "--out", out, "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ""  # --quiet prints nothing
    report = json.loads((out / "report.json").read_text())
    assert set(report["layers"]) == {"net.1", "net.3"}
    assert report["options"]["structure"] == "2:4"
    dense = load_model(trained).net[5].weight
    assert torch.equal(load_model(out / "model.safetensors").net[5].weight, dense)

    out = tmp_path / "global"
    result = invoke(
        "prune", "--model", trained, "--data", "digits", "--method", "random", "--sparsity", "0.5",
        "--allocation", "global", "--max-layer-sparsity", "0.6", "--include", "net.*", "--seed", "7",
        "--num-samples", "32", "--out", out, "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["allocation"] == "global" and report["options"]["seed"] == 7
    assert report["overall"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert all(r["achieved_sparsity"] <= 0.6 for r in report["layers"].values())


def test_out_that_exists_is_refused_without_force(trained, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prune", "--model", trained, "--data", "digits", "--method", "magnitude", "--sparsity", "0.5",
            "--num-samples", "16", "--out", out, "--quiet"]
    assert_bad_input(invoke(*args), "exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "report.json").exists() and (out / "keep.txt").read_text() == "mine"
    # --out naming a file is refused even with --force
    assert_bad_input(invoke(*args[:-3], "--out", out / "keep.txt", "--force"), "must be a directory")


def test_the_input_is_never_overwritten(trained, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(trained.read_bytes())
    before = src.read_bytes()
    result = invoke(
        "prune", "--model", src, "--data", "digits", "--method", "magnitude", "--sparsity", "0.5",
        "--out", tmp_path, "--force",
    )
    assert_bad_input(result, "would overwrite the input")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--method", "magnitude", "--sparsity", "1.5"], ["sparsity", "[0, 1)"]),
        (["--method", "no-such-method", "--sparsity", "0.5"], ["unknown method", "magnitude"]),
        (["--method", "magnitude", "--sparsity", "0.5", "--option", "bogus=3"], ["bogus", "options are"]),
        (["--method", "magnitude", "--sparsity", "0.5", "--option", "novalue"], ["key=value"]),
        (["--method", "magnitude", "--sparsity", "0.5", "--include", "conv*"], ["no prunable layer matches"]),
        (["--method", "magnitude", "--sparsity", "0.9", "--allocation", "global", "--max-layer-sparsity", "0.5"],
         ["raise the cap"]),
        (["--method", "magnitude", "--structure", "3:3"], ["0 < N < M"]),
    ],
)
def test_bad_input_exits_2_with_a_message(trained, tmp_path, extra, fragments):
    out = tmp_path / "o"
    result = invoke("prune", "--model", trained, "--data", "digits", "--num-samples", "16", "--out", out, *extra)
    assert_bad_input(result, *fragments)
    assert not out.exists()  # nothing written on bad input


def test_missing_files_and_bad_data_exit_2(trained, tmp_path):
    base = ["--method", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "o"]
    assert_bad_input(invoke("prune", "--model", tmp_path / "absent.safetensors", "--data", "digits", *base), "does not exist")
    assert_bad_input(invoke("prune", "--model", trained, "--data", "imagenet", *base), "unknown data")
    assert_bad_input(invoke("prune", "--model", trained, "--data", tmp_path / "d.npz", *base), "does not exist")
    assert_bad_input(invoke("evaluate", "--model", tmp_path / "absent.safetensors"), "does not exist")
    # data that does not fit the model (digits net, 2x2 inputs)
    import numpy as np

    np.savez(tmp_path / "small.npz", x=np.zeros((20, 1, 2, 2), np.float32), y=np.zeros(20, np.int64))
    assert_bad_input(invoke("prune", "--model", trained, "--data", tmp_path / "small.npz", *base), "does not fit")


def test_option_values_are_parsed_as_json_when_possible():
    assert core.parse_option("block_size=64") == ("block_size", 64)
    assert core.parse_option("exact=true") == ("exact", True)
    assert core.parse_option("ratio=0.5") == ("ratio", 0.5)
    assert core.parse_option("mode=fast") == ("mode", "fast")
    assert core.parse_option("dims=[1, 2]") == ("dims", [1, 2])
    assert core.parse_option("eq=a=b") == ("eq", "a=b")
    for bad in ("novalue", "=3", "two words=1"):
        with pytest.raises(BrainsurgeonError, match="key=value"):
            core.parse_option(bad)
    with pytest.raises(BrainsurgeonError, match="twice"):
        core.parse_options(["a=1", "a=2"])


def test_method_options_reach_the_method(trained, tmp_path, monkeypatch):
    """--option values arrive typed at the method (checked through the report's method_options)."""
    from brainsurgeon import registry
    from brainsurgeon.pruners.baselines import Magnitude

    class WithOptions(Magnitude):
        """Magnitude with two options, for this test only."""

        summary = "test only"

        def __init__(self, power: float = 1.0, tag: str = ""):
            self.power, self.tag = power, tag

    WithOptions.name = "test-with-options"
    monkeypatch.setitem(registry._REGISTRY, WithOptions.name, WithOptions)
    out = tmp_path / "o"
    result = invoke(
        "prune", "--model", trained, "--data", "digits", "--method", WithOptions.name, "--sparsity", "0.5",
        "--option", "power=2", "--option", "tag=abc", "--num-samples", "16", "--out", out, "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["method_options"] == {"power": 2, "tag": "abc"}


FACTORY_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def make(hidden=16):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    """
)


def test_user_factory_with_torch_weights(tmp_path, monkeypatch):
    (tmp_path / "cli_factory_bs_test.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from cli_factory_bs_test import make

    torch.manual_seed(0)
    torch.save(make(hidden=12).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "o"
    args = ["prune", "--model", tmp_path / "w.pt", "--factory", "cli_factory_bs_test:make", "--factory-kwargs",
            '{"hidden": 12}', "--data", "digits", "--method", "magnitude", "--sparsity", "0.5",
            "--num-samples", "16", "--out", out, "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert read_spec(out / "model.safetensors") == {"factory": "cli_factory_bs_test:make", "kwargs": {"hidden": 12}}
    assert load_model(out / "model.safetensors", factory="cli_factory_bs_test:make")[1].weight.shape == (12, 64)
    # the weights do not fit the default architecture (hidden=16): a clean error
    assert_bad_input(invoke(*args[:5], "--data", "digits", "--method", "magnitude", "--sparsity", "0.5",
                            "--out", tmp_path / "o2"), "do not fit")
    assert_bad_input(invoke("evaluate", "--model", tmp_path / "w.pt"), "no architecture spec")
    assert_bad_input(invoke("evaluate", "--model", tmp_path / "w.pt", "--factory", "cli_factory_bs_test:make",
                            "--factory-kwargs", "[1]"), "JSON object")
    ok = invoke("evaluate", "--model", tmp_path / "w.pt", "--factory", "cli_factory_bs_test:make",
                "--factory-kwargs", '{"hidden": 12}', "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["sparsity"] == 0.0


def test_demo_rejects_bad_arguments(tmp_path):
    """The full demo run (pipeline, plots) is covered by tests/test_pipeline.py::test_demo_runs_the_pipeline_and_writes_plots."""
    from brainsurgeon import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--methods", "nothing-registered"]) == 2
    assert demo.main(["--out", str(out), "--sparsities", "half"]) == 2
    assert not out.exists()
