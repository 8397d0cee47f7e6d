"""Statistics of transformer units over the calibration data.

* :func:`mask_gradients`: per-sequence gradients g_n = d l_n / d m of the loss of sequence n with
  respect to every head and neuron mask variable (m = 1), one forward/backward per batch. The
  model's loss is the mean over the batch of the per-sequence losses, so the gradient with respect
  to a per-sample copy of the mask, times the batch size, is g_n. Parameters are frozen meanwhile
  (only activations are differentiated).
* :class:`BlockRunner`: runs the blocks one at a time over cached hidden states (the "catcher"
  of SparseGPT's reference code): the first block's inputs and keyword arguments (rotary
  embeddings, masks) are caught once per batch, then each block maps the cached states to the next.
  Layer-wise methods use a dense stream and a pruned stream side by side.
* :func:`consumer_inputs`: what o and down read (per unit's columns) during a block's forward.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .transformer import MaskHooks


@contextmanager
def frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def mask_gradients(tctx) -> dict[str, torch.Tensor]:
    """``{unit key: (N, units) float64}``: per-sequence gradients of the loss w.r.t. the masks."""
    device = next(tctx.model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}

    def make(key, batch, units):
        return torch.ones(batch, units, device=device, requires_grad=True)

    with frozen(tctx.model), torch.enable_grad():
        for x, y in tctx.track(tctx.calib.batches, "mask gradients", len(tctx.calib.batches)):
            hooks = MaskHooks(tctx.layers, make=make)
            with hooks:
                loss = tctx.loss_fn(tctx.view(x), y)
            loss.backward()
            for key, made in hooks.created.items():
                out.setdefault(key, []).append((made[0].grad * len(x)).double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


class _Caught(Exception):
    pass


class BlockRunner:
    """Cached hidden states entering each block, per calibration batch."""

    def __init__(self, tctx) -> None:
        self.tctx = tctx
        self.blocks = [u.block for u in tctx.layers]
        self.states: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self.args_rest: list[tuple] = []
        first = self.blocks[0]

        def catch(module, args, kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            self.states.append(h.detach())
            self.args_rest.append(tuple(args[1:]))
            self.kwargs.append(dict(kwargs))
            raise _Caught

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for x, _ in tctx.calib.batches:
                    try:
                        tctx.view(x)
                    except _Caught:
                        pass
        finally:
            handle.remove()

    def run(self, block: nn.Module, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The block applied to each batch's states (its own hooks fire); returns the outputs."""
        out = []
        with torch.no_grad():
            for h, rest, kw in zip(states, self.args_rest, self.kwargs):
                y = block(h, *rest, **kw)
                out.append((y[0] if isinstance(y, (tuple, list)) else y).detach())
        return out


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]):
    """Record the input of each module on every forward: ``{name: [tensor, ...]}``."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: got[n].append(args[0].detach())) for n, m in modules.items()]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def flat(x: torch.Tensor) -> torch.Tensor:
    """(tokens, features) float64."""
    return x.reshape(-1, x.shape[-1]).double()


__all__ = ["mask_gradients", "BlockRunner", "capture_inputs", "frozen", "flat", "MaskHooks"]
