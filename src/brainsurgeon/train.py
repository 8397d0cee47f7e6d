"""Train a model from scratch (the reference models for benchmarks, demos and ``brainsurgeon train``)."""
from __future__ import annotations

import torch
from torch import nn

from .progress import track


def train_model(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Adam on cross-entropy with a cosine learning-rate decay; trains ``model`` in place and returns it."""
    x, y = train_data
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    for _ in track(range(epochs), "training", progress):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval()
