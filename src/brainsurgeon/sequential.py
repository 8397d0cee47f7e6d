"""Block-sequential calibration: the layer-wise statistics in O(L) block passes.

The layer-wise methods (OBC, SparseGPT, Wanda) need, for every target layer, the statistics of its
inputs X in the network whose earlier layers are already pruned (``curvature.layer_inputs``). Run
layer by layer, each layer re-runs the network's prefix on the calibration data: O(L^2) block
passes for L blocks, with the whole model active. The SparseGPT reference (and llm-compressor's
sequential pipeline) instead walks the network block by block:

1. find the model's sequence of blocks (:func:`find_blocks`): the transformer layers of an HF model
   (through ``adapters.hf``), the top-level children of an ``nn.Sequential``, or an
   ``nn.ModuleList`` of ``nn.TransformerEncoderLayer`` (an ``nn.TransformerEncoder`` anywhere in
   the model) -- the last only after :func:`is_chain` has checked on the first batch that the
   forward runs those layers as a plain chain with the same keyword arguments;
2. capture the inputs of the first block, with every keyword argument the model passes to its
   blocks (attention mask, position embeddings, cache flags), by a forward pre-hook
   (``with_kwargs=True``) that stops the forward there;
3. for each block: its target layers are grouped by the tensor they read (q, k, v read one input;
   gate and up another), found by one hooked call of the block on the first sample; then ONE pass
   of the block runs over every cached batch in lockstep (``brainsurgeon.lockstep``): each batch's
   forward pauses at every group's first input; once every batch has paused there, the group's
   statistics (ONE accumulation for the whole group, batches added in order) are complete and the
   group is solved before any batch goes on. Groups later in the block therefore see the pruned
   earlier groups, exactly as the layer-by-layer path does, and the pass's outputs, computed by
   the pruned block, become the next block's inputs.

The result equals the layer-by-layer path (same inputs, same accumulation order; the tests check
masks and weights to 1e-10 in float64) at O(L) block passes: one per block
(``report["calibration"]["block_passes"]`` counts them, plus the capture). The paused forwards hold
their live intermediates: measured on SmolLM2-135M, about 7 MB per 512-token window while a group
is solved. With ``lockstep=False``, when ``"auto"`` estimates that the paused forwards would hold
more than a quarter of the available memory (``LOCKSTEP_MEMORY_FACTOR`` x the cached activations),
above ``MAX_LOCKSTEP_BATCHES`` cached batches, and for error correction, each group gets
a partial pass of its own instead (stopping at the group) and the outputs one more pass, with
bit-identical results (tested). Measured, sparsegpt 50% on SmolLM2-135M (32 x 512 tokens, 2
threads): partial passes 99 s, lockstep 52-60 s, the reference SparseGPT driver 88 s; at 128 x 512
tokens, lockstep on greenlets 187-226 s against the reference's 382-412 s, and with SparseGPT's
column sweep compiled 176-192 s against 374-415 s (six pairs, BENCHMARKS.md).
Earlier, on a random Llama (hidden 256, FFN 688, GQA 8/4 heads; 32 x 128 tokens), layer-by-layer
against the block path with partial passes: 4 layers 15.3 s vs 4.7 s, 8 layers 51.1 s vs 7.6 s.
``activations_dtype`` (e.g. ``torch.bfloat16``) stores the cached activations in a smaller dtype
(each block computes in its own dtype; statistics are accumulated as before).

Error correction (fit to the dense outputs) carries a dense copy of the activations: each block is
copied before it is pruned, and the dense copy's inputs of each group are captured alongside.

Targets outside the blocks (``lm_head`` when included) come after the last block; they are
handled by the layer-by-layer functions on the model whose blocks are then all pruned. If some
target precedes the blocks, a weight is tied across several layers (its H sums every use), the
chain check fails, or no blocks are found, the layer-by-layer path runs; the report says which
path ran (``report["calibration"]["path"]``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .curvature.layer_inputs import (
    LayerInputStats, _Accumulator, _StopForward, check_supported, first_input_rows, linear_holders,
)
from .data import Calibration
from .errors import BrainsurgeonError
from .lockstep import Lockstep
from .memory import LIBC
from .targets import Target, register_input_capture

PATH_BLOCKS = "block-sequential"
PATH_LAYERS = "layer-by-layer"


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's chain of blocks, names as in ``model.named_modules()``, or None."""
    from .adapters.hf import HFAdapter, TokenView, is_hf_model

    hf = model.hf if isinstance(model, TokenView) else model if is_hf_model(model) else None
    if hf is not None:
        try:
            return HFAdapter(hf).blocks(hf)
        except BrainsurgeonError:
            return None
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return list(model.named_children())
    for name, mod in model.named_modules():  # nn.TransformerEncoder's layers, wherever they sit
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and all(isinstance(b, nn.TransformerEncoderLayer) for b in mod):
            return [(f"{name}.{i}", b) for i, b in enumerate(mod)]
    return None


def chain_is_known(model: nn.Module) -> bool:
    """Whether the model's forward is known to run its blocks as a plain chain (HF layouts,
    ``nn.Sequential``); other block lists are checked on data first (:func:`is_chain`)."""
    from .adapters.hf import TokenView, is_hf_model

    return isinstance(model, (TokenView, nn.Sequential)) or is_hf_model(model)


@dataclass
class BlockPlan:
    """The blocks, the targets inside each (in order), and the targets after the last block."""

    blocks: list[tuple[str, nn.Module, list[Target]]]
    tail: list[Target]
    passes: int = 0  # block passes run so far (the report's measure of work)
    lockstep_blocks: int = 0  # blocks calibrated in one lockstep pass (the others: a partial pass per group)
    lockstep_reason: str = ""
    notes: list[str] = field(default_factory=list)
    #: the blocks come from a module list whose use by the forward is not known: check on data first
    verify_chain: bool = False


def _same_kwargs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x is not y and x != y:
            return False
    return True


def is_chain(model: nn.Module, plan: BlockPlan, calib: Calibration) -> bool:
    """Whether, on the first calibration batch, the model feeds its last block what its first block's
    input becomes through the blocks before it, with the same keyword arguments: then the blocks are
    the plain chain that block-sequential calibration assumes."""
    first = Calibration(calib.batches[:1])
    calls, hidden = capture_inputs(model, plan.blocks[0][1], first, None)
    last_calls, last_hidden = capture_inputs(model, plan.blocks[-1][1], first, None)
    h = hidden[0]
    with torch.no_grad():
        for _, block, _ in plan.blocks[:-1]:
            h = call_block(block, calls[0], h, _block_dtype(block))
    ref = last_hidden[0]
    if not _same_kwargs(calls[0].kwargs, last_calls[0].kwargs) or h.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(h, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def _owner(name: str, block_names: list[str]) -> int | None:
    for i, b in enumerate(block_names):
        if name == b or name.startswith(b + "."):
            return i
    return None


def plan_blocks(model: nn.Module, targets: list[Target]) -> BlockPlan | None:
    """Assign targets to blocks; None (the layer-by-layer path) when there are no blocks, a target
    outside the blocks comes before a target inside them, or a weight is applied by several layers."""
    found = find_blocks(model)
    if not found:
        return None
    names = [n for n, _ in found]
    inside: list[list[Target]] = [[] for _ in found]
    tail: list[Target] = []
    for t in targets:
        if len(linear_holders(model, t)) > 1:
            return None  # a weight tied across layers: its H sums every use, which one block pass cannot see
        i = _owner(t.name, names)
        if i is None:
            tail.append(t)
        elif tail:
            return None  # a target outside the blocks runs before this one: keep the exact order
        else:
            inside[i].append(t)
    if not any(inside):
        return None
    return BlockPlan([(n, b, ts) for (n, b), ts in zip(found, inside)], tail, verify_chain=not chain_is_known(model))


# ----------------------------------------------------------------------------- cached block inputs
@dataclass
class BlockInput:
    """One calibration batch's call of a block: positional and keyword arguments besides the hidden state."""

    args: tuple
    kwargs: dict
    positional: bool  # the hidden state is args[0] (else kwargs["hidden_states"])


def capture_inputs(model: nn.Module, block: nn.Module, calib: Calibration, dtype: torch.dtype | None):
    """(call records, hidden states) of ``block``'s first call for every calibration batch."""
    calls: list[BlockInput] = []
    hidden: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        positional = len(args) > 0
        h = args[0] if positional else kwargs["hidden_states"]
        calls.append(BlockInput(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}, positional))
        hidden.append(h.detach() if dtype is None else h.detach().to(dtype))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for x, _ in calib.batches:
                before = len(calls)
                try:
                    model(x)
                except _StopForward:
                    pass
                if len(calls) == before:
                    raise BrainsurgeonError("the model's first block is not called in its forward pass; cannot calibrate block by block")
    finally:
        handle.remove()
    return calls, hidden


def call_block(block: nn.Module, inp: BlockInput, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block's output tensor (its hidden state) on one cached batch."""
    h = hidden.to(dtype) if dtype is not None and hidden.is_floating_point() and hidden.dtype != dtype else hidden
    out = block(h, *inp.args, **inp.kwargs) if inp.positional else block(*inp.args, hidden_states=h, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_dtype(block: nn.Module) -> torch.dtype | None:
    """The dtype a block computes in: its first floating parameter's (None: no parameters)."""
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), None)


def _rows_at(block: nn.Module, module: nn.Module, inp: BlockInput, hidden: torch.Tensor, dtype) -> torch.Tensor:
    """``module``'s input rows at its first call in ``block`` (the pass stops there), captured as the
    layer-by-layer path captures them."""
    return first_input_rows(block, module, lambda: call_block(block, inp, hidden, dtype),
                            "a target layer is not called in its block's forward pass")


def input_groups(block: nn.Module, targets: list[Target], inp: BlockInput, hidden: torch.Tensor, dtype) -> list[list[Target]]:
    """``targets`` grouped by the tensor their first call reads, groups in call order (one hooked pass).
    A target whose module is not itself called (the out_proj of a MultiheadAttention, captured on
    the attention) is a group of its own."""
    first: dict[str, torch.Tensor] = {}
    order: list[Target] = []
    handles = []
    for t in targets:
        def on_rows(rows, t=t):
            if t not in order:
                order.append(t)

        def hook(mod, args, t=t):
            first.setdefault(t.name, args[0])

        handles.append(register_input_capture(block, t.module, on_rows))
        handles.append(t.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_block(block, inp, hidden, dtype)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t not in order]
    if missing:
        raise BrainsurgeonError(
            f"layer(s) {missing} are not called in their block's forward pass, so they have no calibration inputs; "
            "exclude them with layers={'exclude': [...]}"
        )
    groups: list[list[Target]] = []
    for t in order:
        for g in groups:
            if t.name in first and first.get(g[0].name) is first[t.name]:
                g.append(t)
                break
        else:
            groups.append([t])
    return groups


def _first_sample(value, batch: int):
    """``value`` with every tensor whose leading dimension is ``batch`` cut to its first entry."""
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_sample(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _first_sample(v, batch) for k, v in value.items()}
    return value


def probe_groups(block: nn.Module, targets: list[Target], inp: BlockInput, hidden: torch.Tensor, dtype) -> list[list[Target]]:
    """:func:`input_groups` on the first sample of the batch (which tensor each layer reads does not
    depend on the batch size: a 1/B pass instead of a full one), or on the whole batch when the
    block does not accept the cut (e.g. a sequence-first layout whose leading dimension is not the batch)."""
    batch = hidden.shape[0] if hidden.dim() else 1
    if batch > 1:
        small = BlockInput(_first_sample(inp.args, batch), _first_sample(inp.kwargs, batch), inp.positional)
        try:
            return input_groups(block, targets, small, hidden[:1], dtype)
        except (RuntimeError, ValueError, IndexError, TypeError):
            pass
    return input_groups(block, targets, inp, hidden, dtype)


# ----------------------------------------------------------------------------- the walk
Visit = Callable[[str, Target, LayerInputStats], None]


def _group_stats(shadow: Shadow, ref_block, group, hidden, ref_hidden, with_hessian) -> LayerInputStats:
    """ONE accumulation of the group's shared input over every cached batch (paired with the dense
    block's when ``ref_block`` is given: the error-correcting cross term)."""
    lead = group[0]
    check_supported(lead)
    paired = ref_block is not None
    acc = _Accumulator(lead.weight_matrix().shape[1], lead.weight.device, with_hessian or paired, with_cross=paired)
    block, module, dtype = shadow.block, shadow.module(lead), shadow.dtype
    ref_module = ref_block.get_submodule(shadow.relative(lead)) if paired else None
    for i, inp in enumerate(shadow.calls):
        rows = _rows_at(block, module, inp, hidden[i], dtype)
        ref_rows = _rows_at(ref_block, ref_module, inp, ref_hidden[i], dtype) if paired else None
        acc.add(rows, ref_rows)
    return acc.result()


def _relative(target: Target, block: nn.Module) -> str:
    for name, mod in block.named_modules():
        if mod is target.module:
            return name
    raise RuntimeError(f"{target.name} is not inside its block")  # a bug in plan_blocks


def _share(stats: LayerInputStats, last: bool) -> LayerInputStats:
    """The group's statistics for one member: solvers condition H in place, so all but the last get a copy."""
    if last:
        return stats
    clone = (lambda t: None if t is None else t.clone())
    return LayerInputStats(clone(stats.hessian), stats.sq_norms.clone(), stats.num_rows, clone(stats.cross))


def walk_blocks(
    model: nn.Module, plan: BlockPlan, calib: Calibration, visit: Visit, *, with_hessian: bool,
    paired: bool = False, activations_dtype: torch.dtype | None = None, track=None,
    hooks: "BlockHooks | None" = None, lockstep: bool | str = "auto", compute_dtype: torch.dtype | None = None,
) -> None:
    """Visit every target inside the blocks with its input statistics, block by block (module doc).

    ``visit(block_name, target, stats)`` may change the target's weight in place (pruning): later
    groups and blocks see the change. ``paired``: statistics carry the cross term with the dense
    network's inputs (error correction). ``hooks``: what happens around each block and group
    (loading and releasing blocks out of core, splitting a group's solves across ranks).
    ``compute_dtype``: the forwards run in a copy of each block in this dtype (:class:`Shadow`)."""
    hooks = hooks or BlockHooks()
    calls, hidden = capture_inputs(model, plan.blocks[0][1], calib, activations_dtype or compute_dtype)
    fast_calls = None if compute_dtype is None else [cast_floats(c, compute_dtype) for c in calls]
    hidden = hooks.store(hidden)
    ref_hidden = hooks.store([h.clone() for h in hidden]) if paired else None
    plan.passes += 1
    together, plan.lockstep_reason = use_lockstep(lockstep, hidden)
    together = together and not paired  # error correction: partial passes over both the pruned and the dense blocks
    blocks = plan.blocks if track is None else track(plan.blocks, "blocks", total=len(plan.blocks))
    model_dtype = _block_dtype(model)  # for blocks without parameters (activations of a Sequential)
    trim = LIBC.trimmer(LOCKSTEP_TRIM_SLACK)  # one ceiling for the walk: every block's live memory peaks alike
    for bname, block, targets in blocks:
        hooks.before_block(bname, block)
        dtype = _block_dtype(block) or model_dtype
        groups = probe_groups(block, targets, calls[0], hidden[0], dtype) if targets and hooks.prunes(bname) else []
        run = Shadow(block, compute_dtype, fast_calls) if compute_dtype not in (None, dtype) else Shadow.of(block, calls, dtype)
        solve = _group_solver(bname, visit, hooks, run.sync)
        if not together:  # a partial pass per group (with the dense block's beside it for error correction)
            ref_block = copy.deepcopy(run.block) if paired else None
            for group in groups:
                solve(group, _group_stats(run, ref_block, group, hidden, ref_hidden, with_hessian))
                plan.passes += 1
            hidden = hooks.store(_advance(run.block, run.calls, hidden, run.dtype, activations_dtype))
            if paired:
                ref_hidden = hooks.store(_advance(ref_block, run.calls, ref_hidden, run.dtype, activations_dtype))
            plan.passes += 1
        else:
            hidden = hooks.store(_lockstep_block(run, groups, hidden, activations_dtype, with_hessian, solve, trim))
            plan.passes += 1
            plan.lockstep_blocks += 1
        del run
        hooks.after_block(bname, block)


#: during a lockstep pass, allocations under this many bytes come from the heap (see _lockstep_block)
LOCKSTEP_HEAP_BUFFERS = 32 << 20
#: during a lockstep pass, freed heap memory stays resident up to this much over the live memory's high
LOCKSTEP_TRIM_SLACK = 32 << 20

#: above this many cached batches the groups are calibrated by partial passes instead of in lockstep
#: (one greenlet per batch, with its paused forward, is alive during a block's pass)
MAX_LOCKSTEP_BATCHES = 256
#: the paused forwards of a lockstep pass hold about this many times the cached activations (measured
#: 6x on SmolLM2: residual, the attention's or the FFN's input and the FFN's hidden activations; 8
#: leaves room for wider FFNs)
LOCKSTEP_MEMORY_FACTOR = 8
#: ``lockstep="auto"`` runs in lockstep when that estimate is at most this share of the available memory
LOCKSTEP_MEMORY_SHARE = 0.25


def use_lockstep(lockstep, hidden: list[torch.Tensor]) -> tuple[bool, str]:
    """(whether to calibrate in lockstep, why): True/False as asked; "auto" by the memory estimate."""
    if len(hidden) > MAX_LOCKSTEP_BATCHES:
        return False, f"{len(hidden)} cached batches (lockstep runs one greenlet per batch, at most {MAX_LOCKSTEP_BATCHES})"
    if lockstep is not True and lockstep is not False:
        import psutil

        need = LOCKSTEP_MEMORY_FACTOR * sum(h.numel() * h.element_size() for h in hidden)
        free = psutil.virtual_memory().available
        if need > LOCKSTEP_MEMORY_SHARE * free:
            return False, (f"auto: the paused forwards would hold about {need / 2**30:.2f} GiB, over "
                           f"{LOCKSTEP_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB available")
        return True, f"auto: about {need / 2**30:.2f} GiB held by the paused forwards, {free / 2**30:.1f} GiB available"
    return bool(lockstep), "as asked"


def _group_solver(bname: str, visit: Visit, hooks: "BlockHooks", sync: Callable[[list[Target]], None]):
    """``solve(group, stats)``: visit the group's layers this process solves, the group hook (which
    may broadcast the solved weights across ranks), then ``sync`` (the shadow block's copy)."""
    def solve(group: list[Target], stats: LayerInputStats) -> None:
        for j, t in enumerate(group):
            if hooks.solves(j):
                visit(bname, t, _share(stats, j == len(group) - 1))
        hooks.after_group(group)
        sync(group)
    return solve


def cast_floats(value, dtype: torch.dtype):
    """``value`` (a block call's record, tuples, dicts) with every floating tensor cast to ``dtype``
    (rotary cos/sin, additive attention masks: a model run in ``dtype`` builds them in ``dtype``)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, BlockInput):
        return BlockInput(cast_floats(value.args, dtype), cast_floats(value.kwargs, dtype), value.positional)
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


class Shadow:
    """The block the calibration forwards run through, and how its layers map to the block's.

    With ``compute_dtype`` (e.g. bfloat16), a copy of the block in that dtype: the forwards (the
    statistics' inputs and the outputs passed on) run in it, at the speed of the CPU's bfloat16
    matrix units (AMX: measured 8x float32 for a 512 x 576 x 1536 product at one thread), while the
    solves read and update the block's own float32 weights; after each group is solved its new
    weights are copied into the shadow (:meth:`sync`), so later groups and the outputs see them.
    The statistics are accumulated from the low-precision rows in float32/float64 (never in
    bfloat16). Without it, the block itself (``Shadow.of``): no copy, ``sync`` does nothing."""

    def __init__(self, block: nn.Module, dtype: torch.dtype, calls: list[BlockInput]) -> None:
        self.source, self.dtype, self.calls = block, dtype, calls
        self.block = copy.deepcopy(block).to(dtype)
        self._names = {id(m): n for n, m in block.named_modules()}

    @classmethod
    def of(cls, block: nn.Module, calls: list[BlockInput], dtype: torch.dtype | None) -> "Shadow":
        me = cls.__new__(cls)
        me.source, me.block, me.dtype, me.calls, me._names = block, block, dtype, calls, None
        return me

    def module(self, target: Target) -> nn.Module:
        """The module that runs ``target``'s layer in the shadow."""
        return target.module if self._names is None else self.block.get_submodule(self._names[id(target.module)])

    def relative(self, target: Target) -> str:
        """``target``'s module name inside its block."""
        return _relative(target, self.source)

    def sync(self, group: list[Target]) -> None:
        if self._names is None:
            return
        with torch.no_grad():
            for t in group:
                getattr(self.module(t), t.attr).copy_(getattr(t.module, t.attr))


def _lockstep_block(shadow: Shadow, groups, hidden, activations_dtype, with_hessian, solve,
                    trim: Callable[[], None]) -> list[torch.Tensor]:
    """One pass of the block (``shadow.block``) over every cached batch (``brainsurgeon.lockstep``):
    each batch pauses at every group's first input; once all have paused there, the group's
    statistics (added in batch order) are complete and it is solved before any batch goes on.
    ``trim`` is called after every step (``memory.HeapCeiling``). Returns the outputs."""
    block, calls, dtype = shadow.block, shadow.calls, shadow.dtype

    def run(i: int) -> torch.Tensor:
        h, hidden[i] = hidden[i], None  # the caller's list: only the outputs are needed after the pass
        y = call_block(block, calls[i], h, dtype).detach()
        return y if activations_dtype is None else y.to(activations_dtype)

    # Buffers under LOCKSTEP_HEAP_BUFFERS come from the heap during the pass (the call otherwise
    # maps everything from 1 MiB up, see engine.working_context), so that a step reuses the memory
    # the previous batch's step freed instead of faulting in fresh mappings; ``trim`` keeps that
    # memory under a ceiling (memory.HeapCeiling, with its measurements). At 32 MiB the FFN's 25 MB
    # activations (8 x 512 tokens) come from the heap too: sparsegpt 50% on SmolLM2-135M, 64 x 512
    # tokens, 2 threads, 106.1 s at 16 MiB, 102.6 s at 32 MiB, the same RSS.
    with LIBC.heap_buffers_below(LOCKSTEP_HEAP_BUFFERS), Lockstep(len(calls), run, after_step=trim) as steps:
        handles = [register_input_capture(block, shadow.module(g[0]), lambda rows, k=k: steps.pause(k, rows))
                   for k, g in enumerate(groups)]
        try:
            for k, group in enumerate(groups):
                check_supported(group[0])
                acc = _Accumulator(group[0].weight_matrix().shape[1], group[0].weight.device, with_hessian)
                steps.advance(k, lambda i, rows: acc.add(rows),
                              f"layer {group[0].name!r} is not reached in its place in the block's forward pass")
                solve(group, acc.result())
            return steps.finish("a block's forward pass")
        finally:
            for h in handles:
                h.remove()


class BlockHooks:
    """What :func:`walk_blocks` does around blocks and groups; the defaults do nothing.

    Subclasses: ``distributed.SplitHooks`` (each rank solves its share of a group's layers, then
    they are broadcast), ``offload.DiskHooks`` (a block's weights are loaded before it and written
    out and released after it; cached activations live on disk)."""

    def before_block(self, name: str, block: nn.Module) -> None:
        """Called before anything touches ``block``."""

    def after_block(self, name: str, block: nn.Module) -> None:
        """Called once ``block`` is pruned and its outputs are computed."""

    def prunes(self, name: str) -> bool:
        """Whether block ``name`` is to be pruned (False: it already is, e.g. in a resumed run)."""
        return True

    def solves(self, index: int) -> bool:
        """Whether this process solves the ``index``-th layer of the current group."""
        return True

    def dense_pass(self) -> "BlockHooks":
        """The hooks for a pass over the dense blocks that prunes nothing (an allocation's statistics)."""
        return self

    def attach(self, masks: dict) -> None:
        """The method's keep-mask dictionary, filled as layers are solved (hooks may move masks out
        of memory once their block is written)."""

    def after_group(self, group: list[Target]) -> None:
        """Called after every layer of a group that :meth:`solves` is solved."""

    def store(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Where the cached activations live (default: memory as they are)."""
        return hidden


def _advance(block, calls, hidden, dtype, activations_dtype) -> list[torch.Tensor]:
    """The block's outputs on every cached batch: the next block's inputs."""
    out = []
    with torch.no_grad():
        for inp, h in zip(calls, hidden):
            y = call_block(block, inp, h, dtype).detach()
            out.append(y if activations_dtype is None else y.to(activations_dtype))
    return out
