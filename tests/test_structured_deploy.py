"""What makes a structured pruning deployable: BatchNorm recalibration, channel counts rounded to
kernel-friendly multiples, and before/after latency timed interleaved."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.batchnorm import recalibrate_batchnorm
from brainsurgeon.data import Calibration
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.models import SmallResNet, SmallVGG
from brainsurgeon.structured.allocation import round_counts
from brainsurgeon.structured.groups import build_groups
from brainsurgeon.structured.latency import compare, paired_latency_ms

from conftest import NUM_CLASSES, cli_trained_lenet300, fit, tiny_data

COMMON = dict(num_samples=32, batch_size=16, seed=0, structure="channel")


def _bn_inputs(model: nn.Module, calib: Calibration) -> dict[str, list[torch.Tensor]]:
    """Each BatchNorm's inputs per calibration batch, recorded in eval mode (hooks)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].detach()))
        for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
    ]
    return seen, hooks


def test_recalibration_gives_the_average_batch_statistics_of_each_batchnorm_input():
    torch.manual_seed(0)
    model = SmallVGG((1, 8, 8), NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.fill_(3.0)  # stale statistics
            m.running_var.fill_(9.0)
            m.momentum = 0.3
    model.train()  # the training flags must come back as they were
    x, y = tiny_data((1, 8, 8), n=48)
    calib = Calibration.from_data((x, y), batch_size=16)  # 3 batches of 16
    names = recalibrate_batchnorm(model, calib)
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    assert len(names) == 3  # two BatchNorm2d, one BatchNorm1d
    assert all(m.training for m in model.modules())
    assert all(dict(model.named_modules())[n].momentum == 0.3 for n in names)
    # brute force: forward in train mode (batch statistics, as recalibration does) and record inputs
    probe = copy.deepcopy(model)
    seen, hooks = _bn_inputs(probe, calib)
    with torch.no_grad():
        for xb, _ in calib.batches:
            probe(xb)
    for h in hooks:
        h.remove()
    for name in names:
        bn = dict(model.named_modules())[name]
        batches = seen[name]
        per_channel = [b.transpose(0, 1).reshape(b.shape[1], -1) for b in batches]  # (C, N * H * W)
        means = torch.stack([c.mean(1) for c in per_channel])
        variances = torch.stack([c.var(1, unbiased=True) for c in per_channel])
        torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)


def test_prune_recalibrates_on_request_and_reports_it():
    torch.manual_seed(0)
    model = SmallResNet((1, 8, 8), NUM_CLASSES).eval()
    data = tiny_data((1, 8, 8), n=32)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    on = bs.prune(model, data, "l1-norm", 0.5, recalibrate_bn=True, **COMMON)
    off = bs.prune(model, data, "l1-norm", 0.5, recalibrate_bn=False, **COMMON)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert on.report["batchnorm"]["recalibrated"] == bn_names and off.report["batchnorm"]["recalibrated"] == []
    assert any("BatchNorm statistics re-estimated" in n for n in on.report["notes"])
    assert on.report["options"]["recalibrate_bn"] is True
    # without recalibration the kept channels carry the dense statistics; with it they are re-estimated
    mods_off, mods_on = dict(off.model.named_modules()), dict(on.model.named_modules())
    keep_stem = off.masks[next(k for k in off.masks if "stem" in k)]
    torch.testing.assert_close(mods_off["stem.1"].running_mean, dense_state["stem.1.running_mean"][keep_stem])
    assert not torch.allclose(mods_on["stem.1"].running_mean, mods_off["stem.1"].running_mean)
    # the same recalibration, done by hand on the pruned model, gives the same statistics
    manual = copy.deepcopy(off.model)
    recalibrate_batchnorm(manual, Calibration.from_data(data, 32, 16))
    for name in bn_names:
        torch.testing.assert_close(dict(manual.named_modules())[name].running_var, mods_on[name].running_var)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, dense_state[k]), k


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_auto_keeps_the_statistics_with_the_lower_calibration_loss(sign):
    from brainsurgeon.batchnorm import calibration_loss, choose_batchnorm_statistics

    torch.manual_seed(0)
    x, y = tiny_data((1, 8, 8), n=64)
    model = fit(SmallVGG((1, 8, 8), NUM_CLASSES).train(), (x, y))  # fitted: right statistics matter
    calib = Calibration.from_data((x, y), batch_size=32)
    recalibrate_batchnorm(model, calib)
    for m in model.modules():  # statistics badly off for these inputs
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.add_(5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # sign -1 turns the loss around, so that the wrong statistics "win" and must be restored
    loss = lambda out, target: sign * nn.functional.cross_entropy(out, target)  # noqa: E731
    stale_loss = calibration_loss(model, calib, loss)
    rep = choose_batchnorm_statistics(model, calib, loss, "auto")
    assert rep["calibration_loss_stale"] == pytest.approx(stale_loss)
    assert sign * rep["calibration_loss_recalibrated"] < sign * rep["calibration_loss_stale"]  # re-estimating fixes them
    assert calibration_loss(model, calib, loss) == pytest.approx(min(rep["calibration_loss_stale"], rep["calibration_loss_recalibrated"]))
    if sign > 0:
        assert rep["recalibrated"] and not torch.equal(model.state_dict()["features.1.running_mean"], before["features.1.running_mean"])
    else:  # the statistics it had are back, bit for bit
        assert rep["recalibrated"] == []
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_round_counts_keeps_multiples_of_round_to():
    model = SmallResNet((1, 8, 8), NUM_CLASSES, widths=(16, 40, 64))
    groups = build_groups(model, torch.zeros(1, 1, 8, 8), {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    sizes = {g.name: g.num_units for g in groups}
    counts = {name: round(0.3 * n) for name, n in sizes.items()}
    rounded, changed = round_counts(groups, counts, 16)
    for name, n in sizes.items():
        kept = n - rounded[name]
        assert kept % 16 == 0 and 16 <= kept <= n, (name, n, kept)
        # the nearest multiple of what the allocation kept (ties: up)
        assert abs(kept - (n - counts[name])) <= 8
    assert set(changed) == {name for name in sizes if rounded[name] != counts[name]}
    assert round_counts(groups, counts, None) == (counts, [])
    # a group narrower than round_to keeps the allocation's count
    narrow, _ = round_counts(groups, counts, 128)
    assert narrow == counts


def test_prune_round_to_gives_aligned_widths_and_a_note():
    torch.manual_seed(0)
    model = SmallResNet((1, 8, 8), NUM_CLASSES, widths=(16, 32, 64)).eval()
    data = tiny_data((1, 8, 8), n=32)
    res = bs.prune(model, data, "l2-norm", 0.3, round_to=8, **COMMON)
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and widths != [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any("round_to=8" in n for n in res.report["notes"]) and res.report["options"]["round_to"] == 8
    for g in res.report["groups"].values():
        assert g["units_after"] % 8 == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(structure="channel", round_to=0), "round_to must be a positive integer"),
    (dict(structure="channel", round_to="8"), "round_to must be a positive integer"),
    (dict(structure="channel", recalibrate_bn="yes"), "recalibrate_bn must be True, False or 'auto'"),
    (dict(round_to=8), "round_to= applies to structure='channel' only"),
    (dict(recalibrate_bn=False), "recalibrate_bn= applies to structure='channel' only"),
])
def test_bad_deployment_options_are_refused(kwargs, match):
    model = SmallResNet((1, 8, 8), NUM_CLASSES).eval()
    with pytest.raises(BrainsurgeonError, match=match):
        bs.prune(model, tiny_data((1, 8, 8), n=16), "l1-norm", 0.5, num_samples=16, **kwargs)


def test_eigendamage_refuses_round_to():
    model = SmallVGG((1, 8, 8), NUM_CLASSES).eval()
    with pytest.raises(BrainsurgeonError, match="leave round_to out"):
        bs.prune(model, tiny_data((1, 8, 8), n=16), "eigendamage", 0.5, allocation="global", round_to=8,
                 num_samples=16, structure="channel")


class _Sleeper(nn.Module):
    """A model whose forward takes a known time (sleep), to test the timing itself."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_paired_latency_measures_the_ratio_of_interleaved_runs():
    slow, fast = _Sleeper(0.006), _Sleeper(0.002)
    t_slow, t_fast, ratio = paired_latency_ms((slow, fast), (3,), batch=2, rounds=9, warmup=1)
    assert 5.5 < t_slow < 12 and 1.5 < t_fast < 8
    assert 1.5 < ratio < 3.5  # 3 in theory; sleep overshoots add to both
    before, after, speedup = compare(slow, fast, (3,), rounds=5, budget_s=0.01)
    assert set(speedup) == {"batch_1", "batch_64"} and all(1.5 < s < 3.5 for s in speedup.values())
    assert before["params"] == after["params"] == 0 and before["latency_ms"]["batch_64"] > after["latency_ms"]["batch_64"]


def test_paired_latency_stops_at_its_budget_after_five_rounds():
    calls = []

    class Counter(nn.Module):
        def forward(self, x):
            calls.append(1)
            time.sleep(0.003)
            return x

    paired_latency_ms((Counter(), Counter()), (2,), batch=1, rounds=50, warmup=0, budget_s=0.0)
    assert len(calls) == 2 * 5


def test_cli_round_to_and_speedup_in_the_summary(tmp_path):
    from brainsurgeon.io import read_spec

    runner, app, weights = cli_trained_lenet300(tmp_path)
    out = tmp_path / "pruned"
    r = runner.invoke(app, ["prune", "--model", str(weights), "--data", "digits", "--method", "l1-norm", "--sparsity",
                            "0.5", "--structure", "channel", "--round-to", "16", "--num-samples", "128",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    modules = read_spec(out / "model.safetensors")["modules"]
    assert modules["net.1"]["out_features"] == 144 and modules["net.3"]["out_features"] == 48  # 150 -> 144, 50 -> 48
    assert "speedup, batch 64" in r.output
    r = runner.invoke(app, ["prune", "--model", str(weights), "--data", "digits", "--method", "magnitude", "--sparsity",
                            "0.5", "--round-to", "16", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--round-to applies to --structure channel only" in r.output
