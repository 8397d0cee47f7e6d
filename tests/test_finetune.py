"""Fine-tuning with masks held: exact zeros through every optimizer, best-state selection, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.finetune import FineTune, infer_masks

from conftest import tiny_data


def _random_masks(model, seed=0, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < keep
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


OPTIMIZERS = [
    dict(optimizer="sgd", momentum=0.9, weight_decay=1e-2, lr=0.05),
    dict(optimizer="adam", weight_decay=1e-2, lr=1e-2),
    dict(optimizer="adamw", weight_decay=1e-1, lr=1e-2),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["optimizer"])
def test_pruned_weights_stay_exactly_zero(mlp_case, opt):
    """Masks given explicitly on a *dense* model: the pruned weights start non-zero, so only the
    parametrization (and its squash with the parametrized value) can make them exactly zero."""
    model, data = mlp_case
    before = copy.deepcopy(model.state_dict())
    masks = _random_masks(model)
    tuned = bs.finetune(model, data, masks=masks, epochs=3, batch_size=16, val_fraction=0.25, select="last", **opt)
    for name, module in tuned.named_modules():
        if name in masks:
            assert not hasattr(module, "parametrizations"), "parametrization must be squashed"
            assert type(module.weight) is nn.Parameter
            assert torch.all(module.weight[~masks[name]] == 0)
            kept = module.weight[masks[name]]
            assert not torch.equal(kept, model.get_submodule(name).weight[masks[name]]), "kept weights must train"
    assert set(tuned.state_dict()) == set(model.state_dict())  # same architecture, plain parameters
    for k, v in model.state_dict().items():  # the input is never mutated
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["optimizer"])
def test_underlying_parameter_never_drifts(mlp_case, opt):
    """The parametrization's original tensor is zero at pruned entries at every forward pass: neither
    momentum nor weight decay can bring a pruned weight back before the squash."""
    model, data = mlp_case
    masks = _random_masks(model, seed=3)
    worst = []

    def watch(module, _inputs):
        if hasattr(module, "parametrizations"):
            orig = module.parametrizations.weight.original
            worst.append(float(orig.detach()[~module.parametrizations.weight[0].mask.bool()].abs().max()))

    work = copy.deepcopy(model)
    for name in masks:
        work.get_submodule(name).register_forward_pre_hook(watch)
    bs.finetune(work, data, masks=masks, epochs=4, batch_size=8, val_fraction=0.25, **opt)
    assert len(worst) > 10
    assert max(worst) == 0.0


def test_infers_masks_from_zeros_and_improves(mlp_case):
    model, data = mlp_case
    pruned = bs.prune(model, data, "magnitude", 0.6).model
    zeros = {n: m == 0 for n, m in infer_masks(pruned).items()}
    ft = FineTune(data, epochs=20, lr=1e-2, batch_size=16, val_fraction=0, select="last")
    tuned = bs.finetune(pruned, config=ft)
    for name, z in zeros.items():
        w = tuned.get_submodule(name).weight
        assert torch.equal(w == 0, z), "exactly the pruned weights are zero"
    assert evaluate(tuned, data)["loss"] < evaluate(pruned, data)["loss"]


def test_best_state_by_validation_loss_is_returned(mlp_case):
    model, data = mlp_case
    x, y = data
    val = (x[:16], y[:16])
    pruned = bs.prune(model, data, "magnitude", 0.5).model
    # a large learning rate makes later epochs worse than earlier ones on the validation split
    tuned = bs.finetune(pruned, (x[16:], y[16:]), val_data=val, epochs=6, lr=0.5, optimizer="sgd", batch_size=8)
    hist = tuned.finetune_history
    losses = [e["val_loss"] for e in hist["epochs"]]
    assert len(losses) == 6
    best = min(losses + [hist["initial"]["val_loss"]])  # the state before fine-tuning is a candidate too
    assert evaluate(tuned, val)["loss"] == pytest.approx(best, rel=1e-5, abs=1e-6)
    assert hist["best"]["val_loss"] == best


def test_dense_model_finetunes_as_ordinary_model(cnn_case):
    """A model without zeros (e.g. a compact structured result) trains with no parametrization."""
    model, data = cnn_case
    tuned = bs.finetune(model, data, epochs=2, batch_size=16, val_fraction=0.25, select="last")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters()))
    assert set(tuned.state_dict()) == set(model.state_dict())


def test_batches_are_accepted(mlp_case):
    model, (x, y) = mlp_case
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    tuned = bs.finetune(model, loader, epochs=1, val_fraction=0.25)
    assert tuned.finetune_history["options"]["train_samples"] == 36


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(epochs=-1), "epochs"),
        (dict(lr=0), "lr"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(momentum=1.5), "momentum"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(select="best"), "select"),
        (dict(batch_size=0), "batch_size"),
        (dict(nonsense=1), "nonsense"),
    ],
)
def test_bad_options_are_named(mlp_case, kwargs, words):
    model, data = mlp_case
    with pytest.raises(BrainsurgeonError, match=words):
        bs.finetune(model, data, **kwargs)


def test_bad_masks_are_named(mlp_case):
    model, data = mlp_case
    with pytest.raises(BrainsurgeonError, match="shape"):
        bs.finetune(model, data, masks={"0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(BrainsurgeonError, match="nope"):
        bs.finetune(model, data, masks={"nope": torch.ones(3, dtype=torch.bool)})


def test_bad_data_fails_before_work(mlp_case):
    model, (x, y) = mlp_case
    with pytest.raises(BrainsurgeonError, match="differ in length"):
        FineTune((x, y[:-1]))
    with pytest.raises(BrainsurgeonError, match="train_data"):
        bs.finetune(model, None)


def test_cnn_masks_hold(cnn_case):
    model, data = cnn_case
    res = bs.prune(model, data, "magnitude", 0.7)
    tuned = bs.finetune(res.model, data, epochs=3, lr=1e-2, batch_size=16, val_fraction=0.25)
    for name, keep in res.masks.items():
        assert torch.all(tuned.get_submodule(name).weight[~keep] == 0)


def test_zero_budget_with_a_schedule_is_refused_before_work(mlp_case, monkeypatch):
    model, data = mlp_case
    import brainsurgeon.engine as engine

    def boom(*a, **k):
        raise AssertionError("pruning started before the budget was checked")

    monkeypatch.setattr(engine, "prune_step", boom)
    with pytest.raises(BrainsurgeonError, match="budget"):
        bs.prune(model, data, "magnitude", 0.9, schedule="gradual", steps=3, finetune=FineTune(data, epochs=0))


def test_tiny_data_split_is_refused():
    x, y = tiny_data((8,), n=3)
    with pytest.raises(BrainsurgeonError, match="val_fraction"):
        FineTune((x, y), val_fraction=0.1)


def test_attention_in_proj_masks_are_held_during_finetuning():
    """nn.MultiheadAttention's in_proj_weight is a target: its mask is held like a Linear's."""

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h, _ = self.att(x, x, x)
            return self.fc(h.mean(1))

    torch.manual_seed(0)
    x, y = torch.randn(32, 5, 8), torch.randint(0, 4, (32,))
    res = bs.prune(Att(), (x, y), "magnitude", 0.5)
    tuned = bs.finetune(res.model, (x, y), epochs=2, batch_size=8, lr=0.1, select="last")
    pruned = res.masks["att.in_proj_weight"].logical_not()
    assert bool((tuned.att.in_proj_weight[pruned] == 0).all())
    assert not torch.equal(tuned.att.in_proj_weight, res.model.att.in_proj_weight)  # the kept ones trained
