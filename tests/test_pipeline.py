"""Schedules, earlier-pruned weights staying pruned, sensitivity allocation, greedy search, reports, compare."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.schedules import run_schedule, schedule_targets, split_budget
from brainsurgeon.sensitivity import Sensitivity

from conftest import NUM_CLASSES, non_nm_methods, nm_methods, tiny_data

PNG = b"\x89PNG"


# ----------------------------------------------------------------------------- schedules


def test_gradual_targets_follow_zhu_gupta():
    s_f, T = 0.9, 4
    got = schedule_targets("gradual", s_f, T)
    want = [s_f + (0 - s_f) * (1 - t / T) ** 3 for t in range(1, T + 1)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == s_f and all(a < b for a, b in zip(got, got[1:]))


def test_iterative_targets_geometric_and_linear():
    got = schedule_targets("iterative", 0.96, 2)
    assert got == pytest.approx([0.8, 0.96])  # keeps sqrt(0.04) = 0.2 of the weights after round 1
    assert schedule_targets("iterative-linear", 0.9, 3) == pytest.approx([0.3, 0.6, 0.9])
    assert schedule_targets("oneshot", 0.5, 1) == [0.5]


def test_budget_split_is_exact():
    for total, rounds in [(10, 3), (7, 7), (100, 6)]:
        parts = split_budget(total, rounds)
        assert sum(parts) == total and len(parts) == rounds and max(parts) - min(parts) <= 1


def _zero_sets(model, names):
    return {n: model.get_submodule(n).weight.detach() == 0 for n in names}


def _unstructured_methods():
    from brainsurgeon.registry import get_method

    return [m for m in non_nm_methods() + nm_methods() if "unstructured" in get_method(m).structures]


@pytest.mark.parametrize("method", _unstructured_methods())
def test_every_method_keeps_earlier_pruned_weights(mlp_case, method):
    """Each round prunes the current model; round k's zeros stay zero and counts are exact per layer."""
    model, data = mlp_case
    snapshots = []
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    res = run_schedule(
        model, data, method, 0.75, schedule="iterative-linear", steps=3, num_samples=48,
        round_hook=lambda k, m: snapshots.append(_zero_sets(m, names)),
    )
    snapshots.append(_zero_sets(res.model, names))
    for earlier, later in zip(snapshots, snapshots[1:]):
        for n in names:
            assert torch.all(later[n][earlier[n]]), f"{method}: a weight pruned earlier came back in {n}"
    for n in names:
        numel = res.model.get_submodule(n).weight.numel()
        assert int(snapshots[-1][n].sum()) >= round(0.75 * numel)
    assert [r["target_sparsity"] for r in res.report["rounds"]] == pytest.approx([0.25, 0.5, 0.75])
    if method in ("magnitude", "obd", "random", "obs", "sparsegpt"):
        assert res.report["overall"]["achieved_sparsity"] == pytest.approx(
            sum(round(0.75 * res.model.get_submodule(n).weight.numel()) for n in names)
            / sum(res.model.get_submodule(n).weight.numel() for n in names)
        )


def test_random_rounds_would_revive_without_the_constraint(mlp_case):
    """Random scores differ per round (seed + k): the -inf constraint is what keeps round 1's choice."""
    model, data = mlp_case
    r1 = bs.prune(model, data, "random", 0.5, seed=0)
    r2_free = bs.prune(r1.model, data, "random", 0.75, seed=1)
    revived = sum(int((~r1.masks[n] & r2_free.masks[n]).sum()) for n in r1.masks)
    assert revived > 0  # the unconstrained method does revive weights
    res = bs.prune(model, data, "random", 0.75, schedule="iterative-linear", steps=2)
    for n, keep in res.masks.items():
        assert int((~keep).sum()) == round(0.75 * keep.numel())


def test_gradual_with_finetune_recovers(mlp_case):
    model, data = mlp_case
    ft = bs.FineTune(data, epochs=8, lr=1e-2, batch_size=16, val_fraction=0.25)
    oneshot = bs.prune(model, data, "magnitude", 0.8)
    res = bs.prune(model, data, "magnitude", 0.8, schedule="gradual", steps=4, finetune=ft)
    rep = res.report
    assert rep["schedule"]["name"] == "gradual" and len(rep["rounds"]) == 4
    assert sum(r["finetune"]["steps"] for r in rep["rounds"]) == ft.total_steps
    assert rep["overall"]["achieved_sparsity"] == pytest.approx(oneshot.report["overall"]["achieved_sparsity"])
    for n, keep in res.masks.items():
        assert torch.all(res.model.get_submodule(n).weight[~keep] == 0)
    assert evaluate(res.model, data)["loss"] < evaluate(oneshot.model, data)["loss"]


def test_oneshot_with_finetune_and_global(mlp_case):
    model, data = mlp_case
    ft = bs.FineTune(data, epochs=2, batch_size=16, val_fraction=0.25)
    res = bs.prune(model, data, "obd", 0.7, allocation="global", finetune=ft)
    assert res.report["overall"]["numel"] == 8 * 12 + 12 * 8 + 8 * NUM_CLASSES
    assert res.report["overall"]["zeros"] == round(0.7 * res.report["overall"]["numel"])
    assert res.report["finetune"]["total_steps"] == ft.total_steps


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(schedule="cubic"), "schedule"),
        (dict(schedule="gradual", steps=0), "steps"),
        (dict(schedule="oneshot", steps=3), "oneshot"),
        (dict(finetune={"epochs": 1}), "FineTune"),
        (dict(structure="2:4", sparsity=None, schedule="gradual"), "N:M"),
    ],
)
def test_bad_schedules_are_refused(mlp_case, kwargs, words):
    model, data = mlp_case
    args = dict(sparsity=0.5)
    args.update(kwargs)
    with pytest.raises(BrainsurgeonError, match=words):
        bs.prune(model, data, "magnitude", **args)


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_curves_and_plot(mlp_case, tmp_path):
    model, data = mlp_case
    sens = bs.sensitivity(model, data, method="obd", ratios=[0.25, 0.5, 0.75])
    assert set(sens.curves) == {"0", "2", "4"}
    base = evaluate(model, data)
    assert sens.base["loss"] == pytest.approx(base["loss"])
    for name, curve in sens.curves.items():
        assert [p["ratio"] for p in curve] == [0.25, 0.5, 0.75]
        # the 0.75 point is the model with only that layer pruned at 0.75, measured directly
        direct = bs.prune(model, data, "obd", 0.75, layers=[name])
        assert curve[-1]["loss"] == pytest.approx(evaluate(direct.model, data)["loss"])
    sens.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == PNG
    with pytest.raises(BrainsurgeonError, match="ratio"):
        bs.sensitivity(model, data, ratios=[0.5, 1.2])


def test_allocation_avoids_the_sensitive_layer():
    """Synthetic curves: layer a is fragile, b robust; the allocation puts the pruning on b."""
    curve = lambda slope: [{"ratio": r, "loss": 1 + slope * r, "accuracy": 0.5} for r in (0.25, 0.5, 0.75, 0.9)]
    sens = Sensitivity("x", [0.25, 0.5, 0.75, 0.9], {"loss": 1.0, "accuracy": 0.9},
                       {"a": curve(10.0), "b": curve(0.1)}, {"a": 1000, "b": 1000})
    alloc = sens.allocate(0.5, max_layer_sparsity=0.95)
    assert alloc["b"] == pytest.approx(0.95) and alloc["a"] == pytest.approx(0.05)
    assert round(alloc["a"] * 1000) + round(alloc["b"] * 1000) == 1000
    with pytest.raises(BrainsurgeonError, match="max_layer_sparsity"):
        sens.allocate(0.97, max_layer_sparsity=0.9)


@pytest.mark.parametrize("method", ["magnitude", "obc"])
def test_sensitivity_allocation_in_prune(mlp_case, method):
    model, data = mlp_case
    res = bs.prune(model, data, method, 0.6, allocation="sensitivity", num_samples=48)
    total = sum(r["numel"] for r in res.report["layers"].values())
    assert res.report["overall"]["zeros"] == round(0.6 * total)
    alloc = res.report["sensitivity"]["allocation"]
    for name, r in res.report["layers"].items():
        assert r["achieved_sparsity"] == pytest.approx(alloc[name], abs=1.5 / r["numel"])
    assert res.report["options"]["allocation"] == "sensitivity"


# ----------------------------------------------------------------------------- greedy


def test_greedy_respects_tolerance_and_rolls_back(mlp_case):
    model, data = mlp_case
    res = bs.prune(model, data, "greedy", 0.9, tolerance=0.05, chunk=0.1, shortfall="stop")
    g = res.report["greedy"]
    base = evaluate(model, data)["loss"]
    assert g["base_val_loss"] == pytest.approx(base)
    assert evaluate(res.model, data)["loss"] <= base * 1.05 + 1e-9
    assert g["rejected"] > 0 and g["accepted"] > 0 and not g["reached_target"]
    # rolled-back weights are restored exactly: every kept weight equals the original
    for name, keep in res.masks.items():
        assert torch.equal(res.model.get_submodule(name).weight[keep], model.get_submodule(name).weight[keep])
    assert res.report["overall"]["zeros"] == g["pruned_count"]


def test_greedy_fills_the_shortfall_by_least_loss_and_says_so(mlp_case):
    model, data = mlp_case
    stop = bs.prune(model, data, "greedy", 0.9, tolerance=0.05, chunk=0.1, shortfall="stop")
    res = bs.prune(model, data, "greedy", 0.9, tolerance=0.05, chunk=0.1)
    g = res.report["greedy"]
    assert g["reached_target"] and not g["reached_within_tolerance"] and g["forced"] > 0
    assert any("shortfall" in f for f in res.report["numerics"]["fallbacks"])
    for name, r in res.report["layers"].items():
        assert r["pruned"] == round(0.9 * r["numel"])
        # the tolerance-bound part is the same search as with shortfall="stop"
        assert torch.all(~res.masks[name][~stop.masks[name]])
    assert not stop.report["numerics"]["fallbacks"]


def test_greedy_reaches_the_target_when_tolerant(mlp_case):
    model, data = mlp_case
    res = bs.prune(model, data, "greedy", 0.5, tolerance=100.0, allocation="uniform")
    assert res.report["greedy"]["reached_target"]
    for r in res.report["layers"].values():
        assert r["achieved_sparsity"] == pytest.approx(round(0.5 * r["numel"]) / r["numel"])


class _TwoPaths(nn.Module):
    """head(x) + side(x): the side path is negligible, so removing it whole costs (almost) nothing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, NUM_CLASSES)
        self.side = nn.Linear(8, NUM_CLASSES)
        with torch.no_grad():
            self.side.weight.mul_(1e-4)

    def forward(self, x):
        return self.head(x) + self.side(x)


def test_greedy_layer_mode_removes_only_harmless_layers():
    data = tiny_data((8,))
    model = _TwoPaths()
    res = bs.prune(model, data, "greedy", 0.5, unit="layer", tolerance=0.01, shortfall="stop")
    assert res.report["layers"]["side"]["achieved_sparsity"] == 1.0
    assert res.report["layers"]["head"]["achieved_sparsity"] == 0.0
    assert res.report["greedy"]["reached_target"]


def test_greedy_bad_options():
    with pytest.raises(BrainsurgeonError, match="criterion"):
        bs.prune(nn.Linear(8, 4), tiny_data((8,)), "greedy", 0.5, criterion="obs")
    with pytest.raises(BrainsurgeonError, match="unit"):
        bs.prune(nn.Linear(8, 4), tiny_data((8,)), "greedy", 0.5, unit="row")
    with pytest.raises(BrainsurgeonError, match="shortfall"):
        bs.prune(nn.Linear(8, 4), tiny_data((8,)), "greedy", 0.5, shortfall="maybe")


# ----------------------------------------------------------------------------- reports and compare


def test_compare_cli_writes_table_and_plot(tmp_path):
    from typer.testing import CliRunner

    from brainsurgeon.cli import COMMAND_MODULES, app
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name)
    from brainsurgeon.data import load_digits
    from brainsurgeon.io import save_weights
    from brainsurgeon.models import build_model, make_spec
    from brainsurgeon.train import train_model

    ds = load_digits()
    spec = make_spec("lenet300", input_shape=ds.input_shape, num_classes=10, hidden=[32, 16])
    torch.manual_seed(0)
    net = train_model(build_model(spec), ds.train, epochs=2, lr=3e-3)
    save_weights(net, tmp_path / "m.safetensors", spec)
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare", "--model", str(tmp_path / "m.safetensors"), "--data", "digits",
                                 "--methods", "magnitude,obd", "--sparsities", "0.5,0.8", "--out", str(out),
                                 "--finetune-epochs", "0.5", "--num-samples", "128", "--quiet"])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    assert "| magnitude (fine-tuned) |" in md and "sparsity 0.8" in md
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:4] == PNG
    bad = CliRunner().invoke(app, ["compare", "--model", str(tmp_path / "m.safetensors"), "--data", "digits",
                                   "--methods", "magnitude,nope", "--sparsities", "0.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_demo_runs_the_pipeline_and_writes_plots(tmp_path, capsys):
    from brainsurgeon import demo

    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--quiet", "--data", "digits", "--methods", "magnitude,random,not-a-method",
                    "--sparsities", "0.5,0.9", "--epochs", "3", "--num-samples", "128"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out / "report.json")
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["methods"] == ["magnitude", "random"] and report["missing_methods"] == ["not-a-method"]
    cells = {(c["method"], c["sparsity"], c["variant"]): c for c in report["results"]}
    assert set(cells) == {(m, s, v) for m in ("magnitude", "random") for s in (0.5, 0.9) for v in ("one-shot", "fine-tuned")}
    for c in cells.values():
        assert c["achieved_sparsity"] == pytest.approx(c["sparsity"], abs=1e-3)
    # fine-tuning with the masks held recovers accuracy lost by random pruning at 0.9
    assert cells["random", 0.9, "fine-tuned"]["accuracy"] > cells["random", 0.9, "one-shot"]["accuracy"]
    md = (out / "report.md").read_text()
    assert "| magnitude (fine-tuned) |" in md and "| random |" in md and "sensitivity.png" in md
    assert "not-a-method" in md
    for png in ("accuracy_vs_sparsity.png", "sensitivity.png", "gradual/layer_sparsity.png", "gradual/rounds.png"):
        assert (out / png).read_bytes()[:4] == PNG
    assert report["gradual"]["accuracy"] > 0.5
