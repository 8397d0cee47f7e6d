"""Shared fixtures: tiny networks and data that every method can prune in milliseconds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs

NUM_CLASSES = 4

# The test networks are tiny: one thread avoids OpenMP spin-waits that make each op cost
# milliseconds when the machine's cores are busy (measured: 30 steps 8.7 s -> 0.02 s).
torch.set_num_threads(1)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """8 -> 12 -> 8 -> 4: every layer's input width is a multiple of 4, so 2:4 patterns fit."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Two 3x3 convolutions on 1x4x4 inputs and a linear head: covers Conv2d targets."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, NUM_CLASSES),
    )


def tiny_data(input_shape=(8,), n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels from a fixed random teacher, so the labels depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=g)
    teacher = torch.randn(x[0].numel(), NUM_CLASSES, generator=g)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    return x, y


def fit(model: nn.Module, data, steps: int = 30) -> nn.Module:
    """A few full-batch gradient steps so the model is near (not at) a minimum, as pruning assumes.

    Plain updates by hand: torch.optim's first step imports machinery that costs seconds."""
    x, y = data
    params = list(model.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.3 * g)
    return model.eval()


def all_methods() -> list[str]:
    """Methods that prune single weights (structure="channel" ones: tests/test_structured_*)."""
    from brainsurgeon.registry import get_method

    return sorted(m for m in bs.methods() if "unstructured" in get_method(m).structures)


def nm_methods() -> list[str]:
    from brainsurgeon.registry import get_method

    return [m for m in all_methods() if get_method(m).supports_nm]


def non_nm_methods() -> list[str]:
    from brainsurgeon.registry import get_method

    return [m for m in all_methods() if not get_method(m).supports_nm]


@pytest.fixture(scope="session")
def mlp_case():
    """A trained tiny MLP and its data (do not mutate: tests copy what they change)."""
    data = tiny_data((8,))
    return fit(tiny_mlp(), data), data


@pytest.fixture(scope="session")
def cnn_case():
    data = tiny_data((1, 4, 4))
    return fit(tiny_cnn(), data), data


def cli_trained_lenet300(tmp_path):
    """``brainsurgeon train`` of LeNet-300-100 on digits for one epoch; returns (runner, app, weights path)."""
    from typer.testing import CliRunner

    import brainsurgeon.cli.core  # noqa: F401  (registers the commands)
    from brainsurgeon.cli import app

    runner = CliRunner()
    weights = tmp_path / "lenet.safetensors"
    r = runner.invoke(app, ["train", "--arch", "lenet300", "--data", "digits", "--epochs", "1", "--out", str(weights)])
    assert r.exit_code == 0, r.output
    return runner, app, weights
