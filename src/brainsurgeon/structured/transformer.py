"""Structured pruning units of a transformer: attention heads and FFN neurons, and their removal.

A **head unit** of layer l is what disappears together when a head goes:

* without GQA (MHA), query head h: rows ``h*d:(h+1)*d`` of q, k and v (d = head_dim) and the same
  columns of the output projection o;
* with GQA, key/value head j and the r = num_heads / num_kv_heads query heads that share it: k/v
  rows ``j*d:(j+1)*d``, q rows and o columns ``j*r*d:(j+1)*r*d``;
* with ``prune_query_heads=True``, one query head (q rows, o columns); a key/value head goes when
  its last query head goes. ``repeat_kv`` needs the same number of query heads per key/value head,
  so every key/value group of a layer loses the same number (the layer's count is a multiple of
  num_kv_heads).

An **FFN neuron** j: row j of every FFN input projection (gate and up, or fc1) and column j of
the output projection (down, fc2).

Either unit contributes to the residual stream only through its columns of o / down, so a unit is
switched off exactly by scaling those input columns: that is the *mask variable* m of the unit
(Kwon et al. 2022), 1 = kept, 0 = removed. :class:`MaskHooks` multiplies o's and down's inputs by
the masks (for mask gradients and mask tuning); :func:`zero_units` zeroes the removed units' slices
(``compact=False``); :func:`compact_units` builds the smaller layers and patches the per-layer
attributes the installed transformers code reads (head counts, fused split sizes), so the result
is the same HF class. A layer that loses every head gets its attention replaced by
:class:`SkippedAttention` (o's bias only), which is refused unless ``allow_empty_attention=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BrainsurgeonError


# ----------------------------------------------------------------------------- projections
@dataclass
class Proj:
    """A projection module (``nn.Linear``, or GPT-2's ``Conv1D`` whose weight is ``(in, out)``)."""

    name: str
    module: nn.Module

    @property
    def out_axis(self) -> int:
        return 0 if isinstance(self.module, nn.Linear) else 1

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    def weight_oi(self) -> torch.Tensor:
        """The weight as ``(out, in)`` (a view for Linear, a transposed view for Conv1D)."""
        w = self.module.weight
        return w if self.out_axis == 0 else w.t()

    @property
    def bias(self):
        return getattr(self.module, "bias", None)


def _proj(block: nn.Module, prefix: str, ref) -> Proj | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        return Proj(f"{prefix}.{ref}", block.get_submodule(ref))
    name = next((n for n, m in block.named_modules() if m is ref), None)
    if name is None:
        raise BrainsurgeonError(f"the adapter's layout names a module that is not inside {prefix}")
    return Proj(f"{prefix}.{name}", ref)


# ----------------------------------------------------------------------------- units of one layer
@dataclass
class LayerUnits:
    """The head and neuron units of one transformer block (see the module docstring)."""

    index: int
    name: str  # the block's module name
    block: nn.Module
    q: Proj | None
    k: Proj | None
    v: Proj | None
    qkv: Proj | None  # fused [q | k | v] (GPT-2's c_attn)
    o: Proj
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_in: list[Proj]
    mlp_out: Proj
    prune_query_heads: bool = False
    attn_path: str = ""  # module (relative to the block) that computes what o reads

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_head_units(self) -> int:
        return self.num_heads if self.prune_query_heads else self.num_kv_heads

    @property
    def q_heads_per_unit(self) -> int:
        return 1 if self.prune_query_heads else self.group_size

    @property
    def ffn_width(self) -> int:
        return self.mlp_out.weight_oi().shape[1]

    @property
    def heads_key(self) -> str:
        return f"{self.name}.heads"

    @property
    def neurons_key(self) -> str:
        return f"{self.name}.neurons"

    def o_columns(self, units: torch.Tensor) -> torch.Tensor:
        """o's input columns (= q rows) of the head units ``units`` (long)."""
        width = self.q_heads_per_unit * self.head_dim
        return (units[:, None] * width + torch.arange(width)).reshape(-1)

    def kv_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """k/v rows removed when the head units where ``keep`` is False go."""
        if self.prune_query_heads:
            alive = keep.view(self.num_kv_heads, self.group_size).any(1)
        else:
            alive = keep
        dead = torch.nonzero(~alive).squeeze(1)
        return (dead[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def head_params(self) -> int:
        """Parameters that go with one head unit (weights and biases of q/k/v rows and o columns)."""
        hidden = self.o.weight_oi().shape[0]
        qrows = self.q_heads_per_unit * self.head_dim
        kvrows = 0 if self.prune_query_heads else 2 * self.head_dim
        bias = int(self._has_qkv_bias())
        return (qrows + kvrows) * (hidden + bias) + qrows * hidden

    def _has_qkv_bias(self) -> bool:
        p = self.qkv or self.q
        return p.bias is not None

    def neuron_params(self) -> int:
        hidden = self.mlp_out.weight_oi().shape[0]
        return sum(hidden + (p.bias is not None) for p in self.mlp_in) + hidden


def layer_units(model: nn.Module, prune_query_heads: bool = False) -> list[LayerUnits]:
    """The units of every block of an HF transformer, from the adapter's layouts."""
    from ..adapters.hf import HFAdapter

    adapter = HFAdapter(model)
    out = []
    for i, (prefix, block) in enumerate(adapter.blocks(model)):
        lay = adapter.layout(block)
        a, f = lay.attention, lay.mlp
        units = LayerUnits(
            index=i, name=prefix, block=block,
            q=_proj(block, prefix, a.q), k=_proj(block, prefix, a.k), v=_proj(block, prefix, a.v),
            qkv=_proj(block, prefix, a.qkv), o=_proj(block, prefix, a.o),
            num_heads=int(a.num_heads), num_kv_heads=int(a.num_kv_heads or a.num_heads), head_dim=int(a.head_dim),
            mlp_in=[_proj(block, prefix, p) for p in f.inputs], mlp_out=_proj(block, prefix, f.output),
            prune_query_heads=bool(prune_query_heads),
        )
        _check_layer(units, adapter.family)
        units.attn_path = _attention_path(units)
        out.append(units)
    if not out:
        raise BrainsurgeonError("the model has no transformer blocks the adapter recognises")
    return out


def _check_layer(u: LayerUnits, family: str) -> None:
    """Refuse a layout whose slices would not be consistent (named), before any work."""
    hd, h, kv = u.head_dim, u.num_heads, u.num_kv_heads
    if h % kv:
        raise BrainsurgeonError(f"{u.name}: {h} query heads do not split evenly over {kv} key/value heads")
    rows = {"q": h * hd, "k": kv * hd, "v": kv * hd}
    for part, n in rows.items():
        p = getattr(u, part)
        if p is not None and p.weight_oi().shape[0] != n:
            raise BrainsurgeonError(
                f"{p.name} has {p.weight_oi().shape[0]} outputs, not {n} = heads x head_dim: its heads cannot be "
                "pruned consistently"
            )
    if u.qkv is not None and (u.qkv.weight_oi().shape[0] != 3 * h * hd or kv != h):
        raise BrainsurgeonError(f"{u.qkv.name}: a fused q/k/v projection is supported for {h * hd * 3} outputs without GQA")
    if u.o.weight_oi().shape[1] != h * hd:
        raise BrainsurgeonError(f"{u.o.name} reads {u.o.weight_oi().shape[1]} inputs, not heads x head_dim = {h * hd}")
    width = u.ffn_width
    for p in u.mlp_in:
        if p.weight_oi().shape[0] != width:
            raise BrainsurgeonError(f"{p.name} has {p.weight_oi().shape[0]} outputs but {u.mlp_out.name} reads {width}")


def _attention_path(u: LayerUnits) -> str:
    """The block-relative path of the module that produces what o reads (q's parent)."""
    first = (u.qkv or u.q).name[len(u.name) + 1:]
    return first.rsplit(".", 1)[0] if "." in first else ""


# ----------------------------------------------------------------------------- masks as variables
class MaskHooks:
    """Multiply o's and down's inputs by per-unit masks while active (a context manager).

    ``masks[key]`` is ``(units,)`` or, for per-sample gradients, ``(batch, units)``; ``make`` (if
    given) is called with ``(key, batch_size, units)`` in the hook to create the tensor of each
    forward pass (a fresh leaf requiring grad, say), and the created tensors are in ``created``.
    """

    def __init__(self, layers: list[LayerUnits], masks: dict[str, torch.Tensor] | None = None, make=None):
        self.layers, self.masks, self.make = layers, masks or {}, make
        self.created: dict[str, list[torch.Tensor]] = {}
        self._handles = []

    def _hook(self, key: str, width: int):
        def hook(module, args):
            x = args[0]
            if self.make is not None:
                m = self.make(key, x.shape[0], x.shape[-1] // width)
                self.created.setdefault(key, []).append(m)
            else:
                m = self.masks.get(key)
                if m is None:
                    return None
            m = m.to(x.dtype)
            scale = m.repeat_interleave(width, dim=-1)
            if scale.dim() == 2:  # per sample: (B, cols) -> (B, 1, ..., cols)
                scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1])
            return (x * scale,) + tuple(args[1:])
        return hook

    def __enter__(self):
        for u in self.layers:
            self._handles.append(u.o.module.register_forward_pre_hook(self._hook(u.heads_key, u.q_heads_per_unit * u.head_dim)))
            self._handles.append(u.mlp_out.module.register_forward_pre_hook(self._hook(u.neurons_key, 1)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------- removal
def removed_slices(u: LayerUnits, keep_heads: torch.Tensor, keep_neurons: torch.Tensor) -> dict[str, tuple[Proj, int, torch.Tensor]]:
    """``{projection name: (proj, weight axis, positions to drop)}`` for the removed units."""
    out = {}
    dead_heads = torch.nonzero(~keep_heads).squeeze(1)
    q_rows = u.o_columns(dead_heads)
    kv = u.kv_rows(keep_heads)
    if u.qkv is not None:
        e = u.num_heads * u.head_dim
        out[u.qkv.name] = (u.qkv, u.qkv.out_axis, torch.cat([q_rows, kv + e, kv + 2 * e]))
    else:
        out[u.q.name] = (u.q, u.q.out_axis, q_rows)
        out[u.k.name] = (u.k, u.k.out_axis, kv)
        out[u.v.name] = (u.v, u.v.out_axis, kv)
    out[u.o.name] = (u.o, u.o.in_axis, q_rows)
    dead_n = torch.nonzero(~keep_neurons).squeeze(1)
    for p in u.mlp_in:
        out[p.name] = (p, p.out_axis, dead_n)
    out[u.mlp_out.name] = (u.mlp_out, u.mlp_out.in_axis, dead_n)
    return out


def zero_units(layers: list[LayerUnits], keep: dict[str, torch.Tensor]) -> None:
    """Masked mode: zero every slice of the removed units (the bias of an output row too)."""
    with torch.no_grad():
        for u in layers:
            for p, axis, drop in removed_slices(u, keep[u.heads_key], keep[u.neurons_key]).values():
                if len(drop) == 0:
                    continue
                p.module.weight.index_fill_(axis, drop.to(p.module.weight.device), 0.0)
                if axis == p.out_axis and p.bias is not None:
                    p.bias.index_fill_(0, drop.to(p.bias.device), 0.0)


def _slice(p: Proj, axis: int, drop: torch.Tensor) -> None:
    mod = p.module
    n = mod.weight.shape[axis]
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    idx = torch.nonzero(keep).squeeze(1).to(mod.weight.device)
    with torch.no_grad():
        mod.weight = nn.Parameter(mod.weight.index_select(axis, idx).clone(), requires_grad=mod.weight.requires_grad)
        if axis == p.out_axis and p.bias is not None:
            mod.bias = nn.Parameter(mod.bias[idx].clone(), requires_grad=mod.bias.requires_grad)
    new = len(idx)
    if isinstance(mod, nn.Linear):
        if axis == 0:
            mod.out_features = new
        else:
            mod.in_features = new
    else:  # GPT-2 Conv1D: weight (nx, nf)
        if axis == 1:
            mod.nf = new
        else:
            mod.nx = new


class SkippedAttention(nn.Module):
    """Stands in for an attention module that lost every head: its output is o's bias (or zeros),
    the same as o applied to an empty context. Returns ``(output, None)`` like the HF attentions.

    The emptied projections stay as children under their own names (q/k/v with 0 rows, o with 0
    columns), so the block keeps its family's layout and its state-dict keys."""

    def __init__(self, attn: nn.Module, o_name: str | None, out_features: int):
        super().__init__()
        for name, child in attn.named_children():
            if hasattr(child, "weight"):
                self.add_module(name, child)
        self.o_name = o_name  # o inside the replaced module: its bias is the output
        self.out_features = out_features

    def forward(self, hidden_states=None, *args, **kwargs):
        hs = hidden_states if hidden_states is not None else args[0]
        out = hs.new_zeros(*hs.shape[:-1], self.out_features)
        bias = getattr(getattr(self, self.o_name), "bias", None) if self.o_name else None
        return (out + bias if bias is not None else out), None


#: attributes the installed transformers attention classes read at run time, patched per layer
_HEAD_ATTRS = ("num_heads", "num_attention_heads")


def _patch_attention(u: LayerUnits, heads: int, kv_heads: int) -> None:
    attn = u.block.get_submodule(u.attn_path) if u.attn_path else u.block
    for a in _HEAD_ATTRS:
        if isinstance(getattr(attn, a, None), int):
            setattr(attn, a, heads)
    if isinstance(getattr(attn, "num_key_value_heads", None), int):
        attn.num_key_value_heads = kv_heads
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        attn.num_key_value_groups = heads // kv_heads
    if isinstance(getattr(attn, "all_head_size", None), int):  # BERT
        attn.all_head_size = heads * u.head_dim
    if u.qkv is not None and isinstance(getattr(attn, "split_size", None), int):  # GPT-2's fused c_attn
        attn.split_size = heads * u.head_dim


def compact_units(layers: list[LayerUnits], keep: dict[str, torch.Tensor], allow_empty_attention: bool = False) -> list[str]:
    """Slice every layer to its kept units and patch the per-layer attributes; returns the blocks
    whose attention was skipped (every head removed)."""
    skipped = []
    for u in layers:
        kh, kn = keep[u.heads_key], keep[u.neurons_key]
        if not kh.any() and not allow_empty_attention:
            raise BrainsurgeonError(f"{u.name} would lose every attention head; pass allow_empty_attention=True to allow it")
        if not kn.any():
            raise BrainsurgeonError(f"{u.name} would lose every FFN neuron; no layer's FFN is emptied")
        for p, axis, drop in removed_slices(u, kh, kn).values():
            if len(drop):
                _slice(p, axis, drop)
        q_heads = int(kh.sum()) * u.q_heads_per_unit
        kv_heads = u.num_kv_heads - len(u.kv_rows(kh)) // u.head_dim
        if q_heads == 0:
            _skip_attention(u)
            skipped.append(u.name)
        else:
            _patch_attention(u, q_heads, kv_heads)
    return skipped


def _skip_attention(u: LayerUnits) -> None:
    path = u.attn_path
    parent_path, _, child = path.rpartition(".")
    parent = u.block.get_submodule(parent_path) if parent_path else u.block
    attn = getattr(parent, child)
    prefix = f"{u.name}.{path}."
    o_inside = u.o.name.startswith(prefix)
    # o inside the replaced module: its bias is the output; else (BERT) o reads an empty context
    out = u.o.weight_oi().shape[0] if o_inside else 0
    setattr(parent, child, SkippedAttention(attn, u.o.name[len(prefix):] if o_inside else None, out))


# ----------------------------------------------------------------------------- cost model
@dataclass
class UnitCosts:
    """Cost of one head unit and one neuron of each layer: parameters and prefill FLOPs at
    ``seq_len`` tokens (2 per multiply-add; attention scores and the weighted sum of values,
    4 * T^2 * head_dim per query head, are counted with the head)."""

    seq_len: int
    head_params: list[int] = field(default_factory=list)
    neuron_params: list[int] = field(default_factory=list)
    head_flops: list[float] = field(default_factory=list)
    neuron_flops: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, layers: list[LayerUnits], seq_len: int) -> "UnitCosts":
        c = cls(seq_len)
        for u in layers:
            hw = u.head_params() - _bias_count_head(u)
            c.head_params.append(u.head_params())
            c.neuron_params.append(u.neuron_params())
            c.head_flops.append(2.0 * seq_len * hw + 4.0 * seq_len * seq_len * u.head_dim * u.q_heads_per_unit)
            c.neuron_flops.append(2.0 * seq_len * (u.neuron_params() - sum(p.bias is not None for p in u.mlp_in)))
        return c

    def total(self, layers: list[LayerUnits], kind: str) -> float:
        h, n = (self.head_params, self.neuron_params) if kind == "params" else (self.head_flops, self.neuron_flops)
        return float(sum(h[i] * u.num_head_units + n[i] * u.ffn_width for i, u in enumerate(layers)))


def _bias_count_head(u: LayerUnits) -> int:
    rows = u.q_heads_per_unit * u.head_dim + (0 if u.prune_query_heads else 2 * u.head_dim)
    return rows if u._has_qkv_bias() else 0


# ----------------------------------------------------------------------------- per-layer shapes for storage
def layer_structure(model: nn.Module) -> dict:
    """The per-layer shapes of a (possibly pruned) HF transformer, JSON-able, for storage:
    ``{"layers": [{"heads", "kv_heads", "ffn", "skipped"}], "biases": [projection names with a
    bias]}``. Read from the modules, not the config (which keeps the dense counts)."""
    from ..adapters.hf import HFAdapter

    adapter = HFAdapter(model)
    layers, biases = [], []
    for name, block in adapter.blocks(model):
        a, f = adapter.layout(block).attention, adapter.layout(block).mlp
        out_proj = Proj(a.o, block.get_submodule(a.o))
        cols = out_proj.weight_oi().shape[1]
        skipped = any(isinstance(m, SkippedAttention) for m in block.modules())
        if a.qkv is not None:
            kv = 0 if skipped else cols // a.head_dim
        else:
            kv = 0 if skipped else Proj(a.k, block.get_submodule(a.k)).weight_oi().shape[0] // a.head_dim
        ffn = Proj(f.output, block.get_submodule(f.output)).weight_oi().shape[1]
        layers.append({"heads": 0 if skipped else cols // a.head_dim, "kv_heads": kv, "ffn": ffn, "skipped": skipped})
        for rel in (a.q, a.k, a.v, a.qkv, a.o, *f.inputs, f.output):
            if rel and getattr(block.get_submodule(rel), "bias", None) is not None:
                biases.append(f"{name}.{rel}")
    return {"layers": layers, "biases": biases}


def apply_layer_structure(model: nn.Module, structure: dict) -> None:
    """Shape a model freshly built from its (dense) config like :func:`layer_structure` says, in
    place, so that the pruned state dict loads into it (its values are then overwritten)."""
    units = layer_units(model, prune_query_heads=True)
    spec = structure.get("layers", [])
    if len(spec) != len(units):
        raise BrainsurgeonError(f"the stored structure has {len(spec)} layers but the model has {len(units)}")
    keep = {}
    for u, s in zip(units, spec):
        h, kv, ffn = int(s["heads"]), int(s["kv_heads"]), int(s["ffn"])
        per = h // kv if kv else 0
        if not (0 <= kv <= u.num_kv_heads and per <= u.group_size and 1 <= ffn <= u.ffn_width and per * kv == h):
            raise BrainsurgeonError(f"{u.name}: stored heads={h}, kv_heads={kv}, ffn={ffn} do not fit the config's layer")
        mask = torch.zeros(u.num_kv_heads, u.group_size, dtype=torch.bool)
        mask[:kv, :per] = True
        keep[u.heads_key] = mask.reshape(-1)
        keep[u.neurons_key] = torch.arange(u.ffn_width) < ffn
    compact_units(units, keep, allow_empty_attention=True)
    for name in structure.get("biases", []):
        mod = model.get_submodule(name)
        if getattr(mod, "bias", None) is None:
            out = mod.weight.shape[0] if isinstance(mod, nn.Linear) else mod.weight.shape[1]
            mod.bias = nn.Parameter(torch.zeros(out, dtype=mod.weight.dtype, device=mod.weight.device))


__all__ = [
    "Proj", "LayerUnits", "layer_units", "MaskHooks", "removed_slices", "zero_units", "compact_units",
    "SkippedAttention", "UnitCosts", "layer_structure", "apply_layer_structure",
]
