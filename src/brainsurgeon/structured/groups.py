"""Dependency groups for structured (channel / neuron) pruning, and the importance plug-in interface.

Removing output unit ``k`` of a layer (a Linear neuron, a Conv2d filter) touches more than that
layer: its bias, the BatchNorm that follows, the input columns of every consumer (after a flatten,
one unit feeds ``H*W`` consecutive Linear inputs; after a ``torch.cat`` the columns sit at an
offset), and, across a residual ``+``, the same unit of every partner that adds into it. All the
parameter slices that must go together form one :class:`Group`; the group's *units* are what a
criterion scores and what the allocation removes.

Interface (stable; other structured methods build on it):

* :class:`Member`: one module's slices in a group: ``positions[i]`` along the member's axis
  belongs to group unit ``units[i]``. Roles: ``"out"`` (a producer: weight rows / conv filters,
  bias; axis 0), ``"depthwise"`` (a depthwise conv whose channels are the group's units: weight
  dim 0, bias; its in/out channels go together), ``"norm"`` (BatchNorm weight, bias, running
  stats; axis 0), ``"in"`` (a consumer's input columns: weight dim 1).
* :class:`Group`: ``name`` (its root producer), ``num_units``, ``members``; helpers to read each
  member's slices per unit (:meth:`Group.unit_weights`).
* :func:`build_groups`: traces the model (Torch-Pruning's DependencyGraph, see below) and returns
  the prunable groups (:class:`GroupSet`), refusing unsupported layers with a clear error.
* **Importance plug-in**: ``Importance = Callable[[Group, StructuredContext], Tensor]``, returning
  one **non-negative float64 score per unit** (shape ``(group.num_units,)``), higher = more
  important (kept). Scores only need to be comparable *within* a group: for
  ``allocation="global"`` the engine normalizes each group's scores by their L2 norm (Molchanov
  et al. 2017) before one global threshold. A structured method (:class:`StructuredMethod`) is a
  registered class whose :meth:`~StructuredMethod.importance` is such a callable; methods that do
  more than rank units (search, reconstruction) override :meth:`~StructuredMethod.select` and/or
  :meth:`~StructuredMethod.compensate`.
* :class:`StructuredContext`: the :class:`~brainsurgeon.context.PruneContext` (working copy,
  calibration batches, loss, options, generator, numerics, timer) plus lazily collected unit
  activations (:meth:`StructuredContext.activations`) and their loss gradients
  (:meth:`StructuredContext.activation_grads`), cached per group.

Why Torch-Pruning's DependencyGraph for the tracing (evaluated against a torch.fx tracer): it
traces through autograd, so functional code (``torch.relu``, ``x + shortcut``, ``torch.cat``,
``torch.flatten``, ``x.view``) needs no symbolic tracing (torch.fx fails on data-dependent control
flow and needs a leaf-module policy), and its index mappings for flatten/concat/split/residual
coupling are maintained and tested upstream on hundreds of architectures. It is used *only* for
the dependency analysis: the slices are translated into our :class:`Member` records once, and
compaction (:mod:`.compact`), masking (:mod:`.masking`) and the importances are ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import BrainsurgeonError
from ..pruners.base import PruningMethod

if TYPE_CHECKING:  # pragma: no cover
    from ..context import PruneContext

ROLES = ("out", "depthwise", "norm", "in")
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, *NORM_TYPES)


# ----------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class Member:
    """The slices of one module that belong to a group.

    ``positions[i]`` (an index along the member's axis) carries group unit ``units[i]``. A unit
    may own several positions (a conv channel flattened into ``H*W`` Linear inputs); ``positions``
    are sorted by unit, then by position, so ``positions.view(num_units, -1)`` lists each unit's.
    """

    name: str
    module: nn.Module
    role: str  # one of ROLES
    positions: torch.Tensor  # long, (P,)
    units: torch.Tensor  # long, (P,), values in [0, num_units)

    @property
    def axis(self) -> int:
        """The weight dimension the positions index: 1 for a consumer's inputs, else 0."""
        return 1 if self.role == "in" else 0

    def positions_of(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """The positions carried by the units where ``unit_mask`` (bool, ``(num_units,)``) is True."""
        return self.positions[unit_mask[self.units]]


@dataclass
class Group:
    """Coupled output units of one or more producers and every slice that depends on them.

    ``name`` is the root producer's module name (the layer the group is reported under).
    """

    name: str
    num_units: int
    members: list[Member] = field(default_factory=list)

    def by_role(self, *roles: str) -> list[Member]:
        return [m for m in self.members if m.role in roles]

    @property
    def producers(self) -> list[Member]:
        """Layers whose output units are the group's units (several across a residual ``+``)."""
        return self.by_role("out")

    @property
    def consumers(self) -> list[Member]:
        """Layers that read the units as inputs (their input columns go with the units)."""
        return self.by_role("in")

    @property
    def norms(self) -> list[Member]:
        return self.by_role("norm")

    @property
    def layer_names(self) -> list[str]:
        return [m.name for m in self.members]

    def unit_weights(self, member: Member) -> torch.Tensor:
        """The member's weight sliced per unit: ``(num_units, k)``, row u = every weight of unit u.

        For a producer, row u is filter/neuron u flattened; for a consumer, the input columns of
        unit u (all rows, all its positions); for a norm or depthwise conv, its per-channel weights.
        """
        w = member.module.weight.detach()
        if member.axis == 1:
            w = w.transpose(0, 1)
        w = w[member.positions]  # (P, ...) ordered by unit
        return w.reshape(self.num_units, -1)

    def unit_biases(self, member: Member) -> torch.Tensor | None:
        """A producer's / norm's / depthwise conv's bias per unit ``(num_units, k)``, or None."""
        b = getattr(member.module, "bias", None)
        if b is None or member.axis == 1:
            return None
        return b.detach()[member.positions].reshape(self.num_units, -1)

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.name}[{m.role}]" for m in self.members)
        return f"Group({self.name!r}, units={self.num_units}: {parts})"


@dataclass
class GroupSet:
    """The prunable groups of a model, plus the groups held fixed and why (for the report)."""

    groups: list[Group]
    fixed: dict[str, str] = field(default_factory=dict)  # root layer -> reason it is not pruned

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


# ----------------------------------------------------------------------------- importance plug-in
Importance = Callable[[Group, "StructuredContext"], torch.Tensor]
"""``importance(group, sctx) -> Tensor (group.num_units,)``: non-negative, float64, higher = kept."""


class StructuredContext:
    """What a structured criterion may use: the prune context, the groups, and unit activations.

    ``activations(group)`` is what the group's consumers read at the group's positions, i.e. the
    units' post-nonlinearity outputs, as a float64 tensor ``(N, num_units, S)``: N calibration
    samples, S values per unit (conv: the ``H*W`` spatial positions; a conv channel flattened
    into a Linear: its ``H*W`` inputs; a Linear neuron: 1). ``activation_grads(group)`` is
    ``dL_n/da``, the per-sample loss gradient at the same places (same shape). Both are collected
    for all groups in one pass over the calibration data on first use and cached.
    """

    def __init__(self, ctx: "PruneContext", groups: GroupSet) -> None:
        self.ctx = ctx
        self.groups = groups
        self.scores: dict[str, torch.Tensor] = {}  # importances per group, cached by the method
        self._acts: dict[str, torch.Tensor] | None = None
        self._grads: dict[str, torch.Tensor] | None = None

    @property
    def model(self) -> nn.Module:
        return self.ctx.model

    @property
    def calib(self):
        return self.ctx.calib

    def activations(self, group: Group) -> torch.Tensor:
        if self._acts is None:
            from .activations import collect_activations

            with self.ctx.timer("statistics"):
                self._acts, self._grads = collect_activations(self, with_grads=False)
        return self._acts[group.name]

    def activation_grads(self, group: Group) -> torch.Tensor:
        if self._grads is None:
            from .activations import collect_activations

            with self.ctx.timer("statistics"):
                self._acts, self._grads = collect_activations(self, with_grads=True)
        return self._grads[group.name]

    def labels(self, method: str) -> torch.Tensor:
        """Integer class labels of the calibration samples, or an error naming ``method``."""
        y = self.calib.targets()
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            raise BrainsurgeonError(
                f"method {method!r} needs integer class labels (a 1-D tensor of class indices) with the "
                f"data; got targets of dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        return y


class StructuredMethod(PruningMethod):
    """Base class of structured (channel / neuron) criteria. Registered like any method.

    Subclasses implement :meth:`importance` (the plug-in, see :data:`Importance`). The default
    :meth:`select` turns importances into per-group keep-masks with the requested allocation;
    :meth:`compensate` may then change the kept weights of the working copy (e.g. refit a
    consumer by least squares) before the units are removed.
    """

    structures: ClassVar[tuple[str, ...]] = ("channel",)
    #: data the criterion needs beyond weights: any of "activations", "gradients", "labels"
    needs: ClassVar[tuple[str, ...]] = ()

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        raise NotImplementedError  # abstract: each criterion implements it

    def check(self, sctx: StructuredContext) -> None:
        """Checks on the built groups that must fail before any statistics (e.g. a BN per group)."""

    def allocate(self, sctx: StructuredContext) -> tuple[dict[str, int], list[str]]:
        """``({group: units to remove}, [capped groups])`` for the requested allocation.

        Uniform: ``round(r * n)`` per group. Global: one threshold over per-group L2-normalized
        importances, at most ``floor(max_layer_sparsity * n)`` per group. At least one unit stays.
        """
        from .allocation import global_unit_counts, uniform_counts

        o = sctx.ctx.options
        if o.allocation == "global":
            scores = {g.name: self.scores_of(g, sctx) for g in sctx.groups}
            return global_unit_counts(scores, o.sparsity, o.max_layer_sparsity)
        return uniform_counts(sctx.groups, o.sparsity)

    def select(self, sctx: StructuredContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Keep-masks per group (``True`` = kept) removing exactly ``counts[group]`` units each.

        ``counts`` come from :meth:`allocate`; the default removes the least important units.
        """
        from .allocation import lowest_units

        return {g.name: lowest_units(self.scores_of(g, sctx), counts[g.name]) for g in sctx.groups}

    def scores_of(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        """:meth:`importance` with its contract checked (shape, finite, non-negative), cached."""
        if group.name in sctx.scores:
            return sctx.scores[group.name]
        s = self.importance(group, sctx)
        if not isinstance(s, torch.Tensor) or s.shape != (group.num_units,):
            raise RuntimeError(f"{self.name}: importance of {group.name} must have shape ({group.num_units},)")
        s = s.detach().to(torch.float64).cpu()
        if not torch.isfinite(s).all() or (s < 0).any():
            raise RuntimeError(f"{self.name}: importance of {group.name} must be finite and non-negative")
        sctx.scores[group.name] = s
        return s

    def compensate(self, sctx: StructuredContext, keep: dict[str, torch.Tensor]) -> None:
        """Optionally adjust the kept weights of ``sctx.model`` (default: nothing)."""


class WholeModelMethod(StructuredMethod):
    """A structured method that rewrites layers instead of removing units of fixed groups
    (EigenDamage replaces a layer by Q_A -> W' -> Q_S). ``bs.prune(..., structure="channel")``
    hands it the whole call through :meth:`prune_model`, which returns a ``PruneResult``."""

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        raise TypeError(f"{self.name} scores directions of its own eigenbasis, not units of a group")

    def prune_model(self, model: nn.Module, data, sparsity: float, **options):
        raise NotImplementedError  # abstract: each whole-model method implements it


# ----------------------------------------------------------------------------- building groups
def check_supported(model: nn.Module) -> None:
    """Refuse modules whose parameters the group slicing would not know how to cut."""
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]
        if not own:
            continue
        if not isinstance(m, SUPPORTED_TYPES):
            raise BrainsurgeonError(
                f"structured pruning cannot slice layer {name!r} ({type(m).__name__}): it handles Linear, "
                "Conv2d (plain or depthwise), BatchNorm1d/2d and parameter-free layers. Use unstructured "
                "pruning for this model, or replace the layer"
            )
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m):
            raise BrainsurgeonError(
                f"structured pruning cannot slice grouped convolution {name!r} (groups={m.groups}, "
                f"{m.in_channels}->{m.out_channels} channels); only groups=1 and depthwise "
                "(groups = in = out channels) convolutions are supported"
            )


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def build_groups(
    model: nn.Module,
    example_inputs: torch.Tensor,
    prunable: set[str] | None = None,
    explicit: bool = False,
) -> GroupSet:
    """The dependency groups of ``model`` whose producers may lose units.

    ``prunable`` is the set of layer names whose outputs may be pruned (default: every Linear
    and Conv2d). Layers that produce the model's outputs are never pruned (the model's interface
    does not change). ``explicit`` says the user chose the layers: a group only partly chosen
    (e.g. one side of a residual sum) then is an error naming its layers, since it cannot be
    pruned consistently; otherwise such groups are held fixed and reported.
    """
    import torch_pruning as tp

    check_supported(model)
    names = {m: n for n, m in model.named_modules()}
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    outputs = _output_layers(dg, names)
    if prunable is None:
        prunable = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ties = tied_weights(model)
    prunable = set(prunable) | {h for hs in ties for h in hs if set(hs) & set(prunable)}  # a tie is one target
    groups, fixed = [], {}
    for tp_group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        group = _translate(tp_group, names, dg)
        producers = {m.name for m in group.producers}
        reaches_output = sorted(producers & outputs)
        chosen = producers & prunable
        if not producers:
            fixed[group.name] = "no layer produces these units (they are the model's inputs)"
            continue
        if reaches_output:
            fixed[group.name] = f"produces the model's outputs ({', '.join(reaches_output)})"
            continue
        if not chosen:
            fixed[group.name] = "not selected by layers="
            continue
        if chosen != producers:
            if explicit:
                raise BrainsurgeonError(
                    f"layers {sorted(producers)} are coupled (their outputs are added or shared) and must be "
                    f"pruned together, but layers= selects only {sorted(chosen)}; select all or none of them"
                )
            fixed[group.name] = f"coupled with unselected layers {sorted(producers - chosen)}"
            continue
        groups.append(group)
    return _hold_inconsistent_ties(GroupSet(groups, fixed), ties)


def tied_weights(model: nn.Module) -> list[list[str]]:
    """Names of the modules sharing one ``weight`` tensor (``b.weight = a.weight``), per shared tensor."""
    by_id: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            by_id.setdefault(id(w), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _hold_inconsistent_ties(gs: GroupSet, ties: list[list[str]]) -> GroupSet:
    """A tied weight stays one tensor only if every holder is sliced identically (same groups,
    axes and positions: e.g. two tied producers added together). Otherwise every group touching
    a holder is held fixed, with the reason."""
    bad: dict[str, str] = {}
    for holders in ties:
        signatures = {
            h: sorted((g.name, m.axis, tuple(m.positions.tolist())) for g in gs for m in g.members if m.name == h)
            for h in holders
        }
        if len({repr(v) for v in signatures.values()}) > 1:
            for g in gs:
                if any(m.name in holders for m in g.members):
                    bad[g.name] = f"its units would slice the tied weight of {', '.join(holders)} differently per holder"
    kept = [g for g in gs if g.name not in bad]
    return GroupSet(kept, {**gs.fixed, **bad})


def _output_layers(dg, names: dict[nn.Module, str]) -> set[str]:
    """Linear/Conv layers whose outputs reach the model output without passing another such layer."""
    found = set()
    for module, node in dg.module2node.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        stack, seen = list(node.outputs), set()
        reaches = not node.outputs
        while stack and not reaches:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(n.module, (nn.Linear, nn.Conv2d)) and not _is_depthwise(n.module):
                continue
            if not n.outputs:
                reaches = True
            stack.extend(n.outputs)
        if reaches:
            found.add(names[module])
    return found


def _translate(tp_group, names: dict[nn.Module, str], dg) -> Group:
    """Torch-Pruning group -> our :class:`Group` (module slices only; tracing ops are dropped)."""
    root = tp_group[0].dep.target.module
    num_units = dg.get_out_channels(root)
    per_member: dict[tuple[str, str], tuple[nn.Module, list[int], list[int]]] = {}
    for item in tp_group:
        dep = item.dep
        module = dep.target.module
        if not isinstance(module, nn.Module) or module not in names:
            continue  # a traced op (relu, add, cat, flatten): no parameters to cut
        if not isinstance(module, SUPPORTED_TYPES):
            raise BrainsurgeonError(
                f"layer {names[module]!r} ({type(module).__name__}) depends on the units of {names[root]!r} "
                "but structured pruning cannot slice it"
            )
        out_fn = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, NORM_TYPES):
            role = "norm"
        elif _is_depthwise(module):
            role = "depthwise"
        else:
            role = "out" if out_fn else "in"
        key = (names[module], role)
        entry = per_member.setdefault(key, (module, [], []))
        entry[1].extend(int(i) for i in item.idxs)
        entry[2].extend(int(r) for r in item.root_idxs)
    members = []
    for (name, role), (module, pos, units) in per_member.items():
        pos_t, unit_t = torch.tensor(pos, dtype=torch.long), torch.tensor(units, dtype=torch.long)
        # dedupe (a module can be reached twice) and sort by unit, then position
        pairs = torch.unique(torch.stack([unit_t, pos_t], 1), dim=0)
        unit_t, pos_t = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
        counts = torch.bincount(unit_t, minlength=num_units)
        if len(counts) != num_units or not (counts == counts[0]).all() or counts[0] == 0:
            raise BrainsurgeonError(
                f"the units of {names[root]!r} cannot be pruned consistently: layer {name!r} sees them "
                f"unevenly ({counts.tolist()} positions per unit); exclude {names[root]!r} with layers="
            )
        members.append(Member(name, module, role, pos_t, unit_t))
    order = {r: i for i, r in enumerate(ROLES)}
    members.sort(key=lambda m: order[m.role])
    # report the group under a producer (the traced root may be a depthwise conv or a norm)
    producers = [m.name for m in members if m.role == "out"]
    return Group(producers[0] if producers else names[root], int(num_units), members)


def example_input(calib) -> torch.Tensor:
    """A two-sample slice of the calibration inputs for tracing (shapes only matter)."""
    x = calib.batches[0][0]
    return x[: min(2, len(x))]


def units_to_remove(num_units: int, ratio: float) -> tuple[int, bool]:
    """``round(ratio * n)`` units, but never all of them; also whether that cap was needed."""
    k = int(round(ratio * num_units))
    if k > num_units - 1:
        return num_units - 1, True
    return k, False


__all__ = [
    "Member", "Group", "GroupSet", "Importance", "StructuredContext", "StructuredMethod",
    "build_groups", "check_supported", "example_input", "units_to_remove",
]
