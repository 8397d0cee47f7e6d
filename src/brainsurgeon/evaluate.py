"""Accuracy and mean loss of a model on data (any accepted data form)."""
from __future__ import annotations

import torch
from torch import nn

from .data import iter_batches
from .errors import BrainsurgeonError


def _first_batch(model, loss_fn, x, y):
    """The first batch, with a clear message when the data does not fit the model or the loss."""
    try:
        out = model(x)
    except Exception as e:  # the model's own error says which shape it wanted
        raise BrainsurgeonError(
            f"the data does not fit the model: inputs of shape {tuple(x.shape)} raised {type(e).__name__}: {e}"
        ) from e
    try:
        loss = loss_fn(out, y)
    except Exception as e:
        raise BrainsurgeonError(
            f"the loss cannot be computed on outputs {tuple(out.shape)} and targets {tuple(y.shape)} "
            f"({type(e).__name__}: {e}); check the targets"
        ) from e
    return out, loss


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn=None, batch_size: int = 1024, device: str | torch.device = "cpu") -> dict:
    """``{"accuracy", "loss", "samples"}`` of ``model`` (in eval mode) on ``data``; the model's mode is restored."""
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for i, (x, y) in enumerate(iter_batches(data, batch_size)):
            x, y = x.to(device), y.to(device)
            if i == 0:
                out, loss = _first_batch(model, loss_fn, x, y)
            else:
                out = model(x)
                loss = loss_fn(out, y)
            # a mean-reduced loss is scaled back to a sum so batches weigh by size
            total_loss += float(loss) * (1 if getattr(loss_fn, "reduction", "mean") == "sum" else len(x))
            if out.dim() == 2 and y.dim() == 1:
                correct += int((out.argmax(1) == y).sum())
            n += len(x)
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": total_loss / max(n, 1), "samples": n}
