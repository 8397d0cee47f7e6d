"""Hugging Face transformers models: everything brainsurgeon knows about them, in one place.

Interface (the rest of brainsurgeon and its users rely on these names):

``is_hf_model(model) -> bool``
    True for a ``transformers.PreTrainedModel`` (transformers is never imported just to ask).

``HFAdapter(model)``
    The family knowledge of one model. ``.family`` is one of

    * ``"llama"``: any decoder whose blocks have ``self_attn.{q,k,v,o}_proj`` and
      ``mlp.{gate,up,down}_proj`` (Llama, Mistral, Qwen2, SmolLM, ...);
    * ``"gpt2"``: blocks with ``attn.c_attn`` (fused q|k|v), ``attn.c_proj``, ``mlp.c_fc``,
      ``mlp.c_proj`` (``transformers.pytorch_utils.Conv1D``, weight stored (in, out));
    * ``"opt"``: ``self_attn.{q,k,v,out}_proj``, ``fc1``, ``fc2``;
    * ``"bert"``: ``attention.self.{query,key,value}``, ``attention.output.dense``,
      ``intermediate.dense``, ``output.dense`` (BERT, RoBERTa and other BERT-layout encoders).

    A model with none of these layouts raises a one-line ``BrainsurgeonError``.

    * ``.blocks(model) -> list[(name, block)]``: the decoder/encoder layers of ``model`` (the
      adapter's model or any copy of it), names as in ``model.named_modules()``.
    * ``.layout(block) -> BlockLayout``: ``attention = AttentionLayout(q, k, v, o, qkv, num_heads,
      num_kv_heads, head_dim)`` (module names relative to the block; ``qkv`` is GPT-2's fused
      ``c_attn`` and then q, k, v are None; otherwise ``qkv`` is None) and
      ``mlp = MLPLayout(inputs, output)``: ``inputs`` = ("mlp.gate_proj", "mlp.up_proj") /
      ("fc1",) / ("mlp.c_fc",) / ("intermediate.dense",), ``output`` = the down projection.
      Head counts come from the config; Llama's GQA has ``num_kv_heads < num_heads``: the k and v
      projections have ``num_kv_heads * head_dim`` output rows.
    * ``.input_groups(block) -> list[list[str]]``: the block's linears grouped by the input they
      read, in call order (q,k,v | o | gate,up | down; GPT-2: c_attn | attn.c_proj | c_fc | mlp.c_proj).
    * ``.linear_names(block)``: every linear (``nn.Linear`` or ``Conv1D``) of a block, relative names.
    * ``.conv1d_names()``: the model's ``Conv1D`` modules (full names).
    * ``.default_layers() -> list[str]``: every linear inside the blocks (full names); the
      embeddings and ``lm_head`` are excluded by default (``layers=`` patterns can include them).
    * ``.tied_names()``: groups of module names that share one weight (``lm_head`` tied to the
      input embedding): one parameter, pruned at most once.
    * ``.vocab_size``, ``.max_positions``, ``.task`` (see ``TokenView``).

GPT-2's ``Conv1D``. ``conv1d_to_linear(model)`` swaps every ``Conv1D`` of a working copy for an
``nn.Linear`` holding the transposed weight (the same function: ``x W + b`` = ``x (W^T)^T + b``),
so the methods, which handle ``nn.Linear``, see an ordinary (out, in) matrix; it returns the
swapped names. ``linear_to_conv1d(model, names)`` swaps them back (``save_pretrained`` and plain
transformers then load the result), and ``conv1d_masks(masks, names)`` transposes those layers'
masks into the module's own (in, out) orientation.

``TokenView(hf_model)``
    An ``nn.Module`` over the same submodules (``named_modules()`` names and parameters are the
    model's own: no prefix) whose ``forward(tokens)`` takes a LongTensor ``(B, L)`` of ids, or
    ``(B, 2, L)`` stacking input_ids and attention_mask, and returns a tensor: logits ``(B, L, V)``
    for a causal or masked LM, the head's logits for a task head ((B, C) sequence classification,
    (B, L, C) token classification), the last hidden states ``(B, L, H)`` for a plain encoder.
    ``view.loss_fn(outputs, targets)`` is the model's own loss: next-token cross-entropy with the
    shift (causal LM), token cross-entropy (masked LM, token classification), cross-entropy or
    squared error (sequence classification with ``num_labels`` > 1 / = 1); ignore index -100.
    A model without a loss of its own (a plain ``AutoModel``) gets
        loss = 1/(2B) sum_b |h_b - h_b^dense|^2,    targets = the dense model's hidden states,
    whose Hessian with respect to the outputs is I/B: at the dense point its Hessian with respect
    to the weights is the Gauss-Newton matrix J^T J / B. So the engine (per-sample gradients, K-FAC
    hooks, ``Calibration`` of ``(x, y)`` tensor batches) runs on HF models unchanged.

``token_batches(data, model, batch_size=8, num_samples=None) -> list[(x, y)]``
    ``data``: a LongTensor ``(N, L)`` of ids, a mapping of batched tensors (a tokenizer's
    ``BatchEncoding``: ``input_ids``, optional ``attention_mask``, optional ``labels``), or an
    iterable of such mappings (a DataLoader). Everything is validated before any batch is built
    (ids integer and in [0, vocab), length <= the context, mask 0/1 of the ids' shape, labels of
    the task's shape and range), each problem a one-line error. ``x`` is ``(B, L)``, or ``(B, 2, L)``
    when some attention mask has zeros; ``y`` the targets of ``TokenView.loss_fn``.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import BrainsurgeonError, user_stacklevel

IGNORE_INDEX = -100


def is_hf_model(model) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (no import of transformers: a model of
    that class can only exist if transformers is already loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    tf = sys.modules.get("transformers.pytorch_utils")
    return tf is not None and isinstance(module, tf.Conv1D)


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class AttentionLayout:
    """Relative module names of a block's attention projections and its head geometry."""

    q: str | None
    k: str | None
    v: str | None
    o: str
    qkv: str | None  # GPT-2's fused c_attn (columns q | k | v in Conv1D orientation); else None
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MLPLayout:
    """The MLP's input projections (gate, up / fc1 / c_fc / intermediate.dense) and output projection."""

    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class BlockLayout:
    attention: AttentionLayout
    mlp: MLPLayout


@dataclass(frozen=True)
class _Family:
    q: str | None
    k: str | None
    v: str | None
    o: str
    qkv: str | None
    mlp_inputs: tuple[str, ...]
    mlp_output: str

    def names(self) -> list[str]:
        return [n for n in (self.q, self.k, self.v, self.qkv, self.o, *self.mlp_inputs, self.mlp_output) if n]

    def groups(self) -> list[list[str]]:
        attn_in = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        return [attn_in, [self.o], list(self.mlp_inputs), [self.mlp_output]]


# the order matters only for ambiguity; these layouts do not overlap
FAMILIES: dict[str, _Family] = {
    "llama": _Family("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", None,
                     ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    "opt": _Family("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", None,
                   ("fc1",), "fc2"),
    "gpt2": _Family(None, None, None, "attn.c_proj", "attn.c_attn", ("mlp.c_fc",), "mlp.c_proj"),
    "bert": _Family("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", None, ("intermediate.dense",), "output.dense"),
}


def _has_layout(block: nn.Module, fam: _Family) -> bool:
    for name in fam.names():
        try:
            if not _is_linear_like(block.get_submodule(name)):
                return False
        except AttributeError:
            return False
    return True


def _find_blocks(model: nn.Module) -> tuple[str, str] | None:
    """(family, name of the ModuleList of blocks) of the first ModuleList whose every item has one layout."""
    for list_name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        for family, fam in FAMILIES.items():
            if all(_has_layout(block, fam) for block in mod):
                return family, list_name
    return None


def _task(model: nn.Module) -> str:
    """What the model's forward returns and which loss is its own (by the head's class name)."""
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal"
    if cls.endswith("ForMaskedLM"):
        return "masked"
    if cls.endswith("ForSequenceClassification"):
        return "sequence"
    if cls.endswith("ForTokenClassification"):
        return "token"
    if getattr(model, "base_model", None) is model:
        return "hidden"
    raise BrainsurgeonError(
        f"{cls} has a head brainsurgeon does not know the loss of; supported: causal LM, masked LM, "
        "sequence/token classification, or a plain encoder/decoder (AutoModel)"
    )


class HFAdapter:
    """The family knowledge of one transformers model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        if not is_hf_model(model):
            raise BrainsurgeonError(f"{type(model).__name__} is not a transformers PreTrainedModel")
        found = _find_blocks(model)
        if found is None:
            raise BrainsurgeonError(
                f"{type(model).__name__}: no list of transformer blocks with a known layout (families: "
                f"{', '.join(FAMILIES)}); brainsurgeon's HF support covers Llama-like, GPT-2, OPT and BERT layouts"
            )
        self.family, self.blocks_name = found
        self._fam = FAMILIES[self.family]
        self.model = model
        self.config = model.config
        self.task = _task(model)

    # ------------------------------------------------------------------ geometry
    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    def _heads(self) -> tuple[int, int, int]:
        c = self.config
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        return heads, kv, head_dim

    # ------------------------------------------------------------------ blocks and layouts
    def blocks(self, model: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
        """The blocks of ``model`` (default: the adapter's), names as in ``model.named_modules()``."""
        model = self.model if model is None else model
        if isinstance(model, TokenView):
            model = model.hf
        blocks = model.get_submodule(self.blocks_name)
        return [(f"{self.blocks_name}.{i}", b) for i, b in enumerate(blocks)]

    def layout(self, block: nn.Module | None = None) -> BlockLayout:
        f = self._fam
        heads, kv, head_dim = self._heads()
        attn = AttentionLayout(f.q, f.k, f.v, f.o, f.qkv, heads, kv, head_dim)
        return BlockLayout(attn, MLPLayout(f.mlp_inputs, f.mlp_output))

    def input_groups(self, block: nn.Module | None = None) -> list[list[str]]:
        return [list(g) for g in self._fam.groups()]

    def linear_names(self, block: nn.Module) -> list[str]:
        """Every linear of ``block`` (``nn.Linear`` or ``Conv1D``), relative names, module order."""
        return [n for n, m in block.named_modules() if n and _is_linear_like(m)]

    def conv1d_names(self) -> list[str]:
        """Names of the model's ``Conv1D`` modules (GPT-2), which the methods see as ``nn.Linear``."""
        return [n for n, m in self.model.named_modules() if _is_linear_like(m) and not isinstance(m, nn.Linear)]

    def default_layers(self) -> list[str]:
        return [f"{bname}.{rel}" for bname, block in self.blocks() for rel in self.linear_names(block)]

    def tied_names(self) -> list[list[str]]:
        """Module names whose ``weight`` is one shared parameter (e.g. lm_head and embed_tokens)."""
        owners: dict[int, list[str]] = {}
        for name, mod in self.model.named_modules(remove_duplicate=False):
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor):
                owners.setdefault(id(w), []).append(name)
        return [names for names in owners.values() if len(names) > 1]


# ----------------------------------------------------------------------------- GPT-2's Conv1D
def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Swap every ``Conv1D`` of ``model`` (a working copy: changed in place) for an ``nn.Linear``
    with the transposed weight; returns the swapped module names."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if name and _is_linear_like(mod) and not isinstance(mod, nn.Linear):
            nx, nf = mod.weight.shape
            lin = nn.Linear(nx, nf, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            lin.train(mod.training)
            model.set_submodule(name, lin)
            swapped.append(name)
    return swapped


def linear_to_conv1d(model: nn.Module, names: Iterable[str]) -> None:
    """Undo :func:`conv1d_to_linear` on ``names`` (in place): ``Conv1D`` modules with (in, out) weights."""
    conv1d = _conv1d_class()
    for name in names:
        lin = model.get_submodule(name)
        conv = conv1d(lin.out_features, lin.in_features)
        conv.to(device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.T)
            if lin.bias is not None:
                conv.bias.copy_(lin.bias)
            else:
                conv.bias.zero_()
        conv.train(lin.training)
        model.set_submodule(name, conv)


def conv1d_masks(masks: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Masks of swapped layers in the ``Conv1D`` orientation (in, out); the others unchanged."""
    names = set(names)
    return {k: (v.T.contiguous() if k in names else v) for k, v in masks.items()}


# ----------------------------------------------------------------------------- the token view
def split_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask or None) from ``(B, L)`` ids or ``(B, 2, L)`` ids and mask."""
    if tokens.dim() == 3 and tokens.shape[1] == 2:
        return tokens[:, 0], tokens[:, 1]
    if tokens.dim() == 2:
        return tokens, None
    raise BrainsurgeonError(
        f"token inputs must be (B, L) ids or (B, 2, L) ids and attention mask, got shape {tuple(tokens.shape)}"
    )


#: positions of the one sample the engine's data check runs (``TokenView.probe``)
PROBE_POSITIONS = 32


class TokenView(nn.Module):
    """The HF model as a ``tokens -> tensor`` module over the same submodules (see the module docstring).

    The view shares the model's module, parameter and buffer dictionaries, so ``named_modules()``,
    ``state_dict()`` and hooks on submodules are the model's own, and ``copy.deepcopy(view)`` copies
    the model once (the shared dictionaries are one object to deepcopy's memo).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not is_hf_model(model):
            raise BrainsurgeonError(f"TokenView wraps a transformers PreTrainedModel, got {type(model).__name__}")
        object.__setattr__(self, "hf", model)
        object.__setattr__(self, "_modules", model._modules)
        object.__setattr__(self, "_parameters", model._parameters)
        object.__setattr__(self, "_buffers", model._buffers)
        self.task = _task(model)
        self.training = model.training
        params = _forward_params(model)
        # decoders would otherwise build a KV cache on every calibration forward
        self._call_kwargs = {"use_cache": False} if "use_cache" in params else {}

    def train(self, mode: bool = True) -> "TokenView":
        super().train(mode)
        self.hf.training = mode
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = split_tokens(tokens)
        out = self.hf(input_ids=ids, attention_mask=mask, **self._call_kwargs)
        return out.last_hidden_state if self.task == "hidden" else out.logits

    def probe(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's first ``PROBE_POSITIONS`` positions, for the engine's check that the data fit
        and give a finite loss (a language model's logits over 2 x 512 tokens of SmolLM2 are 200 MB,
        and the loss doubles them; every token id is validated separately)."""
        n = min(tokens.shape[-1], PROBE_POSITIONS)
        tokens = tokens[:1, ..., :n]
        if self.task == "sequence" or not isinstance(targets, torch.Tensor) or targets.dim() < 2:
            return tokens, targets[:1] if isinstance(targets, torch.Tensor) and targets.dim() else targets
        return tokens, targets[:1, :n]

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return task_loss(self.task, outputs, targets, getattr(self.hf.config, "num_labels", None))


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (-100 ignored; 0, not NaN, when none is)."""
    labels = labels.reshape(-1).long()
    total = nn.functional.cross_entropy(
        logits.reshape(labels.numel(), -1).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def task_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """The model's own loss (see ``TokenView.loss_fn``)."""
    if task == "causal":  # position t predicts token t + 1
        return _token_ce(outputs[:, :-1], targets[:, 1:])
    if task in ("masked", "token"):
        return _token_ce(outputs, targets)
    if task == "sequence":
        if num_labels == 1:
            return nn.functional.mse_loss(outputs.squeeze(-1).float(), targets.float())
        return nn.functional.cross_entropy(outputs.float(), targets.long())
    # plain encoder: squared distance to the dense hidden states, Hessian I/B in the outputs
    diff = (outputs - targets).float()
    return 0.5 * diff.square().sum() / max(outputs.shape[0], 1)


# ----------------------------------------------------------------------------- token batches
def _as_long(value, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, (list, tuple)):  # a tokenizer's output without return_tensors
        try:
            value = torch.as_tensor(value)
        except (ValueError, TypeError, RuntimeError) as e:
            raise BrainsurgeonError(f"{what} must be a rectangular array of token ids (pad the sequences): {e}") from e
    if not isinstance(value, torch.Tensor):
        raise BrainsurgeonError(f"{what} must be a tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise BrainsurgeonError(f"{what} must hold integer token ids, got dtype {value.dtype}")
    return value.long()


def _raw_batches(data) -> list[dict]:
    """The user's data as a list of {"input_ids", "attention_mask"?, "labels"?} dicts (not yet checked)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return [{"input_ids": data}]
    if isinstance(data, Mapping):
        return [dict(data)]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        raise BrainsurgeonError(
            "an (inputs, targets) pair is not token data; pass the LongTensor (N, L) of ids, or dicts with "
            "input_ids/attention_mask/labels"
        )
    if not isinstance(data, Iterable):
        raise BrainsurgeonError(
            f"token data must be a LongTensor (N, L), a dict of input_ids/attention_mask/labels, or an "
            f"iterable of such dicts; got {type(data).__name__}"
        )
    out = []
    for i, batch in enumerate(data):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise BrainsurgeonError(f"batch {i} is a {type(batch).__name__}; each batch must be a dict with input_ids")
        out.append(dict(batch))
    if not out:
        raise BrainsurgeonError("the token data is empty: give at least one sequence")
    return out


def _check_batch(where: str, batch: dict, adapter: HFAdapter) -> dict:
    """One batch validated against the model: ids, mask and labels as long tensors."""
    ids = _as_long(batch["input_ids"], f"{where}input_ids")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise BrainsurgeonError(f"{where}input_ids must be (N, L) with N, L >= 1, got shape {tuple(ids.shape)}")
    vocab, ctx_len = adapter.vocab_size, adapter.max_positions
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise BrainsurgeonError(
            f"{where}token ids range over [{lo}, {hi}] but the model's vocabulary has {vocab} entries: "
            "tokenize with the model's own tokenizer"
        )
    if ctx_len is not None and ids.shape[1] > ctx_len:
        raise BrainsurgeonError(
            f"{where}sequences of {ids.shape[1]} tokens exceed the model's context of {ctx_len}; use shorter windows"
        )
    if adapter.task == "causal" and ids.shape[1] < 2:
        raise BrainsurgeonError(f"{where}a causal LM needs sequences of at least 2 tokens (next-token loss)")
    out = {"input_ids": ids, "attention_mask": None, "labels": None}
    if batch.get("attention_mask") is not None:
        mask = torch.as_tensor(batch["attention_mask"])
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise BrainsurgeonError(f"{where}attention_mask must have the shape of input_ids {tuple(ids.shape)}")
        if ((mask != 0) & (mask != 1)).any() or (mask.sum(1) == 0).any():
            raise BrainsurgeonError(f"{where}attention_mask must be 0/1 with at least one 1 per sequence")
        out["attention_mask"] = mask.long()
    if batch.get("labels") is not None:
        out["labels"] = _check_labels(where, batch["labels"], ids, adapter)
    elif adapter.task in ("sequence", "token"):
        raise BrainsurgeonError(f"{where}a {type(adapter.model).__name__} needs labels in the batches (its loss uses them)")
    return out


def _check_labels(where: str, labels, ids: torch.Tensor, adapter: HFAdapter) -> torch.Tensor:
    task = adapter.task
    labels = torch.as_tensor(labels)
    num_labels = getattr(adapter.config, "num_labels", None)
    if task == "sequence":
        if labels.shape != ids.shape[:1]:
            raise BrainsurgeonError(f"{where}labels must be (N,) for sequence classification, got {tuple(labels.shape)}")
        if num_labels == 1:
            return labels.float()
        labels = _as_long(labels, f"{where}labels")
        if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
            raise BrainsurgeonError(f"{where}labels must be in [0, {num_labels}) (config.num_labels)")
        return labels
    if task == "hidden":
        raise BrainsurgeonError(f"{where}{type(adapter.model).__name__} has no head: leave labels out")
    labels = _as_long(labels, f"{where}labels")
    if labels.shape != ids.shape:
        raise BrainsurgeonError(f"{where}labels must have the shape of input_ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
    top = num_labels if task == "token" else adapter.vocab_size
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < top))
    if not bool(valid.all()):
        raise BrainsurgeonError(f"{where}labels must be -100 (ignored) or in [0, {top})")
    return labels


def _split(batch: dict, batch_size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: (None if v is None else v[i : i + batch_size]) for k, v in batch.items()} for i in range(0, n, batch_size)]


class TokenBatches(list):
    """The ``(x, y)`` batches, and ``given``: how many sequences the data held (``len`` counts batches)."""

    given: int = 0

    @property
    def used(self) -> int:
        return sum(len(x) for x, _ in self)


def token_batches(data, model: nn.Module, batch_size: int = 8, num_samples: int | None = None) -> TokenBatches:
    """``(x, y)`` tensor batches for ``data.Calibration`` from token data (see the module docstring).

    The first ``num_samples`` sequences are used (None: all; a truncation is warned about).
    Everything is validated before anything is built; a plain encoder's targets (its dense hidden
    states) are computed with ``model`` on its device.
    """
    adapter = HFAdapter(model)
    for name, value in (("batch_size", batch_size), ("num_samples", num_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BrainsurgeonError(f"{name} must be a positive integer, got {value!r}")
    raw = _raw_batches(data)
    checked = [_check_batch(f"batch {i}: " if len(raw) > 1 else "", b, adapter) for i, b in enumerate(raw)]
    given = sum(b["input_ids"].shape[0] for b in checked)
    if num_samples is not None and given > num_samples:
        warnings.warn(f"calibration data truncated: the first {num_samples} of {given} sequences are used "
                      f"(num_samples={num_samples}); pass num_samples=None to use all of them",
                      stacklevel=user_stacklevel())
    batches, seen = [], 0
    for b in checked:
        for part in _split(b, batch_size):
            if num_samples is not None:
                part = {k: (None if v is None else v[: num_samples - seen]) for k, v in part.items()}
            if part["input_ids"].shape[0] == 0:
                break
            batches.append(part)
            seen += part["input_ids"].shape[0]
    with_mask = any(b["attention_mask"] is not None and bool((b["attention_mask"] == 0).any()) for b in batches)
    view = TokenView(model) if adapter.task == "hidden" else None
    out = TokenBatches(_to_xy(b, adapter.task, with_mask, view) for b in batches)
    out.given = given
    return out


def _to_xy(b: dict, task: str, with_mask: bool, view: TokenView | None) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = b["input_ids"], b["attention_mask"]
    if with_mask:
        x = torch.stack([ids, mask if mask is not None else torch.ones_like(ids)], dim=1)
    else:
        x = ids
    if view is not None:  # plain encoder: the dense hidden states are the targets
        device = next(view.hf.parameters()).device
        with torch.no_grad():
            return x, view(x.to(device)).detach().to(x.device)
    y = b["labels"]
    if y is None:  # LM: predict the tokens themselves; padding is not a target
        y = ids.clone() if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return x, y
