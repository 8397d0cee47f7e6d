"""Inference-only sparse replacements for pruned ``nn.Linear`` and ``nn.Conv2d`` layers.

Each keeps its pruned weight as CSR and computes ``W @ X^T`` with one engine of :mod:`.kernels`.
A ``SparseLinear`` may hold two: one for calls with at most ``decode_rows`` input rows (decoding a
token at batch 1 is one row: a matrix-vector product) and one for more (a prompt's hundreds of rows:
a matrix-matrix product), because the fastest engine differs between the two; "dense" may be
either, in which case the dense weight is kept as well and ``F.linear`` runs.
A convolution is lowered to that product by unfolding its input into patches (im2col): for an
input (B, C, H, W) the patches form ``X^T`` of shape (C*kh*kw, B*L), L output positions, and the
sparse weight (out x C*kh*kw) multiplies them directly. The unfold costs memory and time that a
direct sparse convolution would avoid, which is why ``to_sparse`` times the result against the
dense convolution and keeps the dense one where it is faster.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import CSR, get_engine


DECODE_ROWS = 8  # calls with at most this many input rows use the decode engine


class SparseModule(nn.Module):
    """Common part: the CSR weight, the engines' prepared states, the bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str,
                 decode_engine: str | None = None, decode_rows: int = DECODE_ROWS):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        self.csr = CSR.from_dense(weight)
        self.engine = engine
        self.decode_engine = decode_engine or engine
        self.decode_rows = decode_rows
        self._prepare()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _prepare(self) -> None:
        self._states = {e: get_engine(e).prepare(self.csr) for e in {self.engine, self.decode_engine} if e != "dense"}
        uses_dense = "dense" in (self.engine, self.decode_engine)
        self._dense_weight = self.csr.to_dense().reshape(self.weight_shape) if uses_dense else None
        self._vector = None if self.decode_engine == "dense" else \
            get_engine(self.decode_engine).vector_fn(self._states[self.decode_engine])
        self._group: DecodeGroup | None = None

    def __deepcopy__(self, memo):
        # torch's sparse tensors and scipy/numba states do not all deep-copy: rebuild the states instead
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_states", "_dense_weight", "_vector", "_group"):
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._prepare()
        new._group = None
        if self.__dict__.get("_group") is not None:  # the copied group re-links its copied members
            new._group = copy.deepcopy(self._group, memo)
        return new

    def engine_for(self, rows: int) -> str:
        return self.decode_engine if rows <= self.decode_rows else self.engine

    def dense_parameters(self) -> dict[str, torch.Tensor]:
        """``weight`` (and ``bias``) as the dense layer held them, for saving and ONNX export."""
        out = {"weight": self.csr.to_dense().reshape(self.weight_shape)}
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out

    def to_dense_layer(self) -> nn.Module:
        """The equivalent dense layer (for export and saving)."""
        layer = self._dense_layer()
        layer.load_state_dict(self.dense_parameters())
        return layer.eval()

    def matmul_t(self, xt: torch.Tensor) -> torch.Tensor:
        """``W @ xt`` for ``xt`` of shape (in, n), float32."""
        engine = self.engine_for(xt.shape[1])
        with torch.no_grad():
            if engine == "dense":
                return self._dense_weight.reshape(self.weight_shape[0], -1) @ xt.to(torch.float32)
            return get_engine(engine).apply(self._states[engine], xt.to(torch.float32))

    def extra_repr(self) -> str:
        engines = self.engine if self.decode_engine == self.engine else \
            f"{self.decode_engine} (<= {self.decode_rows} rows) / {self.engine}"
        return f"shape={self.weight_shape}, nnz={self.csr.nnz}, sparsity={self.csr.sparsity:.3f}, engine={engines}"


def conv1d_class():
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out)), or None."""
    import sys

    if "transformers" not in sys.modules:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_view(layer: nn.Module) -> nn.Linear:
    """``layer`` as an ``nn.Linear`` (a GPT-2 ``Conv1D`` computes x W + b = x (W^T)^T + b)."""
    if isinstance(layer, nn.Linear):
        return layer
    w = layer.weight.detach().t()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(w)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


class SparseLinear(SparseModule):
    """A pruned ``nn.Linear`` (or GPT-2 ``Conv1D``: ``conv1d=True`` keeps its (in, out) layout for saving)."""

    def __init__(self, linear: nn.Module, engine: str = "numba_csr", decode_engine: str | None = None,
                 decode_rows: int = DECODE_ROWS):
        self_conv1d = not isinstance(linear, nn.Linear)
        linear = linear_view(linear)
        super().__init__(linear.weight, linear.bias, engine, decode_engine, decode_rows)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.conv1d = self_conv1d

    def dense_parameters(self) -> dict[str, torch.Tensor]:
        out = super().dense_parameters()
        if self.conv1d:
            out["weight"] = out["weight"].t().contiguous()
        return out

    def _dense_layer(self) -> nn.Module:
        if self.conv1d:
            return conv1d_class()(self.out_features, self.in_features)
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self._vector is not None and x.numel() == self.in_features and x.dtype == torch.float32 \
                and not x.requires_grad:  # one row (a decoded token): the engine's direct path
            y = self._group.output(self, x) if self._group is not None else \
                self._vector(x if x.is_contiguous() else x.contiguous())
            if self.bias is not None:
                y += self.bias
            return y.view(*lead, self.out_features)
        if self.engine_for(x.numel() // max(self.in_features, 1)) == "dense":
            return F.linear(x, self._dense_weight, self.bias)
        xt = x.reshape(-1, self.in_features).t()
        # The engines return W @ x^T, (out, rows): handed on transposed, every later op (attention's
        # reshapes, the MLP's product, the residual add) ran on strided memory, and a 70%-sparse SmolLM2
        # prefill of 512 tokens took 1960 ms against dense torch's 1916 although its linears saved 336 ms.
        y = self.matmul_t(xt).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class DecodeGroup:
    """Sibling ``SparseLinear`` s that read the same input (q/k/v, gate/up): one product per decoded token.

    A decoded token calls q_proj, k_proj and v_proj on the same hidden state, one after another. The
    group stacks their weights into one matrix (their states become row slices of it: no second
    copy); the first member called on a one-row input computes every member's output in one kernel
    call, and the others are handed their rows. One call instead of three, and one long stream of
    weights from memory instead of three short ones that each start cold.

    Outputs are memoised on the input *object* and its version counter (an in-place change of the
    input is a new version), per thread, and each member's rows are handed out once: a second call
    of the same member, another input, or an inference-mode tensor (which has no version counter)
    computes that member's rows alone, with the same kernel on its slice of the stacked weights.
    """

    def __init__(self, members: list[SparseLinear]):
        engines = {m.decode_engine for m in members}
        if len(members) < 2 or len(engines) != 1 or not get_engine(next(iter(engines))).stackable:
            raise ValueError("a decode group needs two or more SparseLinears with one stackable decode engine")
        if len({m.in_features for m in members}) != 1:
            raise ValueError("a decode group's members must read inputs of the same width")
        self.members = list(members)
        self._link()

    def _link(self) -> None:
        import threading

        engine = get_engine(self.members[0].decode_engine)
        stacked = engine.stack([m._states[m.decode_engine] for m in self.members])
        self.slices, start = [], 0
        for m in self.members:
            stop = start + m.out_features
            m._states[m.decode_engine] = engine.row_slice(stacked, start, stop)  # the old state is freed
            m._vector = engine.vector_fn(m._states[m.decode_engine])
            m._group = self
            self.slices.append(slice(start, stop))
            start = stop
        self._index = {id(m): i for i, m in enumerate(self.members)}
        self._product = engine.vector_fn(stacked)
        self._local = threading.local()

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.members = [copy.deepcopy(m, memo) for m in self.members]
        new._link()
        return new

    def __getstate__(self):
        raise TypeError("a decode group holds kernel closures and does not pickle: save the model with bs.save")

    def output(self, member: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s product with the one-row ``x``: from the group's product of ``x`` if pending."""
        i, memo = self._index[id(member)], self._local
        if x.is_inference():  # no version counter to tell an in-place change: the member's rows alone
            return member._vector(x if x.is_contiguous() else x.contiguous())
        if getattr(memo, "x", None) is x and memo.version == x._version and not memo.taken[i]:
            memo.taken[i] = True
            y = memo.y[self.slices[i]]
            if all(memo.taken):  # every share handed out: hold nothing until the next token
                memo.x = memo.y = None
            return y
        memo.x, memo.version, memo.taken = x, x._version, [False] * len(self.members)
        memo.y = self._product(x if x.is_contiguous() else x.contiguous())
        memo.taken[i] = True
        return memo.y[self.slices[i]]


class SparseConv2d(SparseModule):
    """A Conv2d with ``groups == 1`` and zero padding, as unfold + sparse matrix product."""

    def __init__(self, conv: nn.Conv2d, engine: str = "numba_csr"):
        super().__init__(conv.weight, conv.bias, engine)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.pad = _explicit_padding(conv)  # (left, right, top, bottom), as F.pad takes it
        self.config = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)

    def _dense_layer(self) -> nn.Conv2d:
        return nn.Conv2d(**self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        b = x.shape[0]
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (B, C*kh*kw, L)
        h_out, w_out = (_out_size(x.shape[2 + i], self.kernel_size[i], self.stride[i], self.dilation[i]) for i in (0, 1))
        xt = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)  # (C*kh*kw, B*L)
        y = self.matmul_t(xt).reshape(self.out_channels, b, h_out * w_out).permute(1, 0, 2)
        y = y.reshape(b, self.out_channels, h_out, w_out)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def _out_size(size: int, k: int, s: int, d: int) -> int:
    return (size - d * (k - 1) - 1) // s + 1


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # stride 1 only (torch's rule); the extra pixel goes right/bottom as torch does
        pads = []
        for i in (1, 0):
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_unsupported(conv: nn.Conv2d) -> str | None:
    """Why a Conv2d cannot become a SparseConv2d (None if it can)."""
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convolution) is kept dense"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is kept dense"
    return None
