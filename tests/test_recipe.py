"""Recipes: validation before any work, a full run, and checkpoint/resume equal to an uninterrupted run."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.io import load_state
from brainsurgeon.recipe import load_recipe, run_recipe, validate

PNG = b"\x89PNG"


def _recipe(out, **over) -> dict:
    body = {
        "model": {"arch": "lenet300", "kwargs": {"hidden": [24, 12]}, "train": {"epochs": 2, "lr": 0.003}},
        "data": "digits",
        "method": "magnitude",
        "sparsity": 0.8,
        "schedule": "gradual",
        "steps": 4,
        "finetune": {"epochs": 2, "lr": 0.002, "batch_size": 64},
        "num_samples": 128,
        "output": str(out),
    }
    body.update(over)
    return body


def _write(path, body) -> str:
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"sparsityy": 0.5}, "unknown key 'sparsityy'"),
        ({"sparsity": "high"}, "key 'sparsity' must be"),
        ({"steps": 2.5}, "key 'steps' must be integer"),
        ({"finetune": {"epochs": 1, "learning_rate": 0.1}}, "finetune: unknown key 'learning_rate'"),
        ({"model": {"weights": "missing.safetensors"}}, "does not exist"),
        ({"model": {"arch": "lenet300"}}, "train"),
        ({"data": "missing.npz"}, "does not exist"),
        ({"data": "imagenet"}, "key 'data'"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method_options": {"bogus": 1}}, "bogus"),
        ({"schedule": "cubic"}, "schedule"),
        ({"model": {"arch": "lenet300", "train": {"epochs": 1, "momentum": 0.9}}}, "model.train: unknown key 'momentum'"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, change, words):
    body = _recipe(tmp_path / "out", **change)
    with pytest.raises(BrainsurgeonError, match=words):
        validate(body, base=tmp_path)


def test_missing_keys_and_non_mapping(tmp_path):
    body = _recipe(tmp_path / "out")
    del body["method"]
    with pytest.raises(BrainsurgeonError, match="missing required key"):
        validate(body, base=tmp_path)
    with pytest.raises(BrainsurgeonError, match="mapping"):
        validate(["a", "b"])
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(BrainsurgeonError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(BrainsurgeonError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


class Killed(Exception):
    """Stands in for Ctrl-C / a kill in the middle of a run."""


def _kill_at(round_index):
    def hook(k, _model):
        if k == round_index:
            raise Killed(f"killed at the start of round {k}")

    return hook


def test_resume_equals_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    full = run_recipe(validate(_recipe(tmp_path / "full"), base=tmp_path))
    cut = validate(_recipe(tmp_path / "cut"), base=tmp_path)
    with pytest.raises(Killed):
        run_recipe(cut, round_hook=_kill_at(3))  # rounds 1 and 2 completed and saved
    # the run works in .cut.partial/ beside its output and renames it only when finished
    state = json.loads((tmp_path / ".cut.partial" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and len(state["history"]) == 2
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = run_recipe(cut, resume=True)
    assert resumed["schedule"]["resumed_from_round"] == 2
    a, b = load_state(tmp_path / "full" / "model.safetensors"), load_state(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["evaluation"]["accuracy_after"] == full["evaluation"]["accuracy_after"]
    strip = lambda rounds: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rounds]
    assert strip(resumed["rounds"]) == strip(full["rounds"])


def test_resume_refuses_other_recipe_or_missing_checkpoint(tmp_path):
    body = _recipe(tmp_path / "run", steps=3)
    with pytest.raises(Killed):
        run_recipe(validate(body, base=tmp_path), round_hook=_kill_at(2))
    other = validate(dict(body, sparsity=0.7), base=tmp_path)
    with pytest.raises(BrainsurgeonError, match="different recipe"):
        run_recipe(other, resume=True)
    with pytest.raises(BrainsurgeonError, match="no checkpoint"):
        run_recipe(validate(_recipe(tmp_path / "fresh"), base=tmp_path), resume=True)


def test_cli_run_writes_model_report_and_plots(tmp_path):
    from brainsurgeon.cli import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        importlib.import_module(name)
    path = _write(tmp_path / "r.yaml", _recipe("out", method="obd", allocation="global", steps=2, schedule="iterative"))
    r = CliRunner().invoke(app, ["run", path, "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"  # relative paths are relative to the recipe file
    report = json.loads((out / "report.json").read_text())
    assert report["schedule"]["spacing"] == "geometric"
    assert report["overall"]["zeros"] == round(0.8 * report["overall"]["numel"])
    assert report["recipe"]["hash"] and report["evaluation"]["accuracy_after"] > 0.1
    assert (out / "layer_sparsity.png").read_bytes()[:4] == PNG
    assert (out / "rounds.png").read_bytes()[:4] == PNG
    assert "![layer sparsity](layer_sparsity.png)" in (out / "report.md").read_text()
    assert (out / "model.safetensors").exists()
    bad = CliRunner().invoke(app, ["run", _write(tmp_path / "b.yaml", _recipe("o", sparsity=2))])
    assert bad.exit_code == 2 and "sparsity" in bad.output
    missing = CliRunner().invoke(app, ["run", path, "--resume"])
    assert missing.exit_code == 0  # the finished run's checkpoint is complete: resuming returns its result


def test_sensitivity_recipe_writes_sensitivity_plot(tmp_path):
    body = _recipe(tmp_path / "s", schedule="oneshot", allocation="sensitivity", method="obd")
    del body["steps"]
    body["finetune"] = {"epochs": 1}
    report = run_recipe(validate(body, base=tmp_path))
    assert report["sensitivity"]["allocation"]
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:4] == PNG


@pytest.mark.parametrize(
    "change, words",
    [
        ({"sparsity": 1.5}, "sparsity must be in"),
        ({"allocation": "best"}, "allocation"),
        ({"finetune": {"optimizer": "lbfgs"}}, "optimizer"),
        ({"finetune": {"epochs": 0}}, "epochs"),
    ],
)
def test_option_values_are_checked_before_any_work(tmp_path, change, words, monkeypatch):
    import brainsurgeon.recipe as recipe_mod

    monkeypatch.setattr(recipe_mod, "_build_model", lambda *a: pytest.fail("work started before validation"))
    with pytest.raises(BrainsurgeonError, match=words):
        run_recipe(validate(_recipe(tmp_path / "o", **change), base=tmp_path))
