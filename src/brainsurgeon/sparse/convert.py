"""``bs.to_sparse``: swap pruned layers for sparse modules where, measured, they run faster.

For every ``nn.Linear`` / ``nn.Conv2d`` the dense layer and each usable sparse engine run on the
layer's real input shape (captured from one forward pass of an example batch); the fastest wins,
the dense layer included. The choice is kept in ``model.sparse_report`` (one dict per layer: engine,
sparsity, reason, median milliseconds per engine, speed-up over dense).

Hugging Face ``transformers`` models are timed per phase instead: "decode" (one input row: a token
at batch 1 with the KV cache) and "prefill" (``prefill_tokens`` rows: a prompt), on random inputs of
the layer's real width; each ``SparseLinear`` keeps the winner of each phase and dispatches on the
number of input rows at run time (<= ``DECODE_ROWS``: the decode engine). Decode is timed over
copies of the layer's weights that together exceed the CPU's private caches, since a decoded token
reads every weight once, from memory; prefill reuses each weight for hundreds of rows. Layers of the same shape,
sparsity and N:M pattern share one measurement (the report names the layer it was measured on).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ..errors import BrainsurgeonError
from .kernels import SPARSE_ENGINES, CSR, get_engine
from .modules import DECODE_ROWS, DecodeGroup, SparseConv2d, SparseLinear, conv1d_class, conv_unsupported, linear_view

# Below this sparsity no CPU sparse kernel beats dense BLAS (an index per value at least doubles the
# bytes per weight read), so such layers stay dense without being timed.
MIN_SPARSITY = 0.3
MATCH_RTOL = 1e-5


def _time_ms(fn: Callable[[], torch.Tensor], budget_s: float = 0.15, max_repeats: int = 25) -> float:
    """Median wall time of ``fn`` in ms, after two warm-up calls (JIT compile, caches)."""
    fn()
    fn()
    times, start = [], time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _example_input(model: nn.Module, example_input, batch_size: int):
    if example_input is not None:
        return example_input
    spec = getattr(model, "brainsurgeon_spec", None) or {}
    shape = (spec.get("kwargs") or {}).get("input_shape")
    if shape is None and "arch" in spec:
        shape = (1, 28, 28)  # the reference models' default input
    return None if shape is None else torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0))


def _capture_inputs(model: nn.Module, layers: dict[str, nn.Module], example) -> dict[str, torch.Tensor]:
    """Each layer's input on one forward pass of ``example`` (so convolutions are timed at their real size)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].detach()))
             for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise BrainsurgeonError(f"the example input {tuple(example.shape)} does not run through the model ({e}); "
                                "pass example_input= of the shape the model takes") from e
    finally:
        for h in hooks:
            h.remove()
    return seen


def _stand_in_input(module: nn.Module, batch_size: int) -> torch.Tensor:
    """A random input when no example is known: (batch, in) for Linear, 16x16 maps for Conv2d."""
    g = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        return torch.randn(batch_size, module.in_features, generator=g)
    return torch.randn(batch_size, module.in_channels, 16, 16, generator=g)


def _sparse_module(module: nn.Module, engine: str) -> nn.Module:
    return SparseConv2d(module, engine) if isinstance(module, nn.Conv2d) else SparseLinear(module, engine)


def _why_dense(module: nn.Module, sparsity: float, min_sparsity: float, forced: bool) -> str | None:
    if module.weight.dtype != torch.float32:
        return f"dtype {module.weight.dtype} (sparse kernels are float32)"
    if isinstance(module, nn.Conv2d) and (why := conv_unsupported(module)):
        return why
    if not forced and sparsity < min_sparsity:
        return f"sparsity {sparsity:.3f} below {min_sparsity} (dense BLAS is faster)"
    return None


def _matches(y: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = ref.abs().max().clamp_min(1e-30)
    return bool(((y - ref).abs().max() / scale) <= MATCH_RTOL * 10)


def _choose(module: nn.Module, x: torch.Tensor, engines: tuple[str, ...], entry: dict):
    """Time dense and every engine on ``x``; return the fastest module (the dense one if it wins)."""
    with torch.no_grad():
        ref = module(x)
        times = {"dense": _time_ms(lambda: module(x))}
        best, best_module = "dense", module
        for name in engines:
            candidate = _sparse_module(module, name)
            if not _matches(candidate(x), ref):  # an engine that disagrees with dense is never used
                entry.setdefault("rejected", {})[name] = "output differs from dense"
                continue
            times[name] = _time_ms(lambda: candidate(x))
            if times[name] < times[best]:
                best, best_module = name, candidate
    entry.update(engine=best, times_ms={k: round(v, 4) for k, v in times.items()},
                 speedup_vs_dense=round(times["dense"] / times[best], 3),
                 reason="fastest measured" if best != "dense" else "dense measured fastest")
    return best_module


def _choose_phased(module: nn.Linear, phases: dict[str, int], engines: tuple[str, ...], entry: dict, cache: dict,
                   name: str) -> nn.Module:
    """Per phase (rows of input), the fastest of dense and ``engines``; one SparseLinear dispatching on rows."""
    from .kernels import nm_pattern_of

    original, module = module, linear_view(module)  # a GPT-2 Conv1D is timed as the Linear it computes
    csr = CSR.from_dense(module.weight)
    key = (tuple(module.weight.shape), round(csr.sparsity, 3), nm_pattern_of(csr), engines, tuple(phases.items()))
    if key not in cache:
        g = torch.Generator().manual_seed(0)
        winners, times, rejected = {}, {}, {}
        candidates = {e: SparseLinear(module, e) for e in engines}
        for phase, rows in phases.items():
            x = torch.randn(rows, module.in_features, generator=g)
            # decode reads the weights once per token: timed over copies that do not fit the caches
            times[phase] = _time_phase(module, candidates, engines, x, rows <= DECODE_ROWS, rejected)
            winners[phase] = min(times[phase], key=times[phase].get)
        cache[key] = (winners, times, rejected, name)
    winners, times, rejected, measured_on = cache[key]
    entry.update(engine=dict(winners), times_ms={p: {k: round(v, 4) for k, v in t.items()} for p, t in times.items()},
                 speedup_vs_dense={p: round(t["dense"] / t[winners[p]], 3) for p, t in times.items()},
                 dispatch=f"<= {DECODE_ROWS} input rows: decode engine, more: prefill engine",
                 reason="fastest measured per phase" + ("" if measured_on == name else f" (measured on {measured_on}: "
                                                                                        "same shape and sparsity)"))
    if rejected:
        entry["rejected"] = dict(rejected)
    if set(winners.values()) == {"dense"}:
        return original
    return SparseLinear(original, winners.get("prefill", winners["decode"]), decode_engine=winners["decode"])


#: bytes of distinct weight copies a decode-phase timing cycles through: a decoded token reads every
#: layer's weights once, from memory or the last-level cache, never from L1/L2 as a layer timed
#: over and over on the same weights does (there dense BLAS wins at 1 thread even at 70% sparsity:
#: measured on SmolLM2, every layer chose dense)
DECODE_WORKING_SET = 64 * 2**20


def _copies(module: nn.Linear) -> int:
    return max(1, min(64, DECODE_WORKING_SET // max(module.weight.numel() * module.weight.element_size(), 1)))


DECODE_ROUNDS = 7  # interleaved rounds of the decode timing: a burst of other work hits every candidate alike


def _time_cycling(makers: dict[str, Callable[[nn.Linear], nn.Module]], copies: list[nn.Linear], x) -> dict[str, float]:
    """Median ms of one call per candidate, each call on the next copy of the weights (cold caches).

    The candidates are timed in interleaved rounds, one sweep over all copies per candidate per round:
    timed one after another, a noisy moment on a shared machine decided a layer's engine (measured on
    SmolLM2 at 2:4: 150 of 210 layers chose dense in one run, none in the next).
    """
    built = {name: [make(c) for c in copies] for name, make in makers.items()}
    samples: dict[str, list[float]] = {name: [] for name in built}
    for mods in built.values():  # warm-up: JIT compile, first-touch of every copy
        for m in mods:
            m(x)
    for _ in range(DECODE_ROUNDS):
        for name, mods in built.items():
            t0 = time.perf_counter()
            for m in mods:
                m(x)
            samples[name].append((time.perf_counter() - t0) * 1e3 / len(mods))
    return {name: statistics.median(v) for name, v in samples.items()}


def _time_phase(module: nn.Linear, candidates: dict[str, nn.Module], engines, x, cold: bool, rejected: dict) -> dict:
    """ms per call of dense and every engine that agrees with dense on ``x``; ``cold``: over copies."""
    with torch.no_grad():
        ref = module(x)
        ok = []
        for e in engines:
            if _matches(candidates[e](x), ref):
                ok.append(e)
            else:
                rejected[e] = "output differs from dense"
        if not cold:
            times = {"dense": _time_ms(lambda: module(x))}
            times.update({e: _time_ms(lambda e=e: candidates[e](x)) for e in ok})
            return times
        copies = [copy.deepcopy(module) for _ in range(_copies(module))]
        makers = {"dense": lambda c: c, **{e: (lambda c, e=e: SparseLinear(c, e)) for e in ok}}
        times = _time_cycling(makers, copies, x)
        return times


def _usable_engines(engines, csr: CSR) -> tuple[str, ...]:
    return tuple(n for n in engines if get_engine(n).available() is None and get_engine(n).supports(csr) is None)


def to_sparse(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    batch_size: int = 1,
    engines: tuple[str, ...] | list[str] | None = None,
    engine: str | None = None,
    min_sparsity: float = MIN_SPARSITY,
    prefill_tokens: int = 512,
) -> nn.Module:
    """A copy of ``model`` with pruned Linear/Conv2d layers replaced by sparse modules (inference only).

    Per layer the dense layer and each engine (``engines``, default all usable of
    :data:`.kernels.SPARSE_ENGINES`: bitmask, numba CSR / N:M, mkl, torch CSR / BSR) are timed on
    the layer's input for ``example_input`` (default: a random batch of ``batch_size`` in the
    model's spec input shape); the fastest is kept. ``engine=`` forces
    one engine on every supported layer without timing. The input model is not modified.
    The copy's ``sparse_report`` says, per layer, the engine chosen, why, and the times measured.

    A transformers model is timed per phase, decode (1 row) and prefill (``prefill_tokens`` rows),
    and each layer dispatches on its input's row count (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"to_sparse needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BrainsurgeonError(f"batch_size must be a positive integer, got {batch_size!r}")
    names = tuple(engines) if engines is not None else SPARSE_ENGINES
    for n in names + ((engine,) if engine else ()):
        get_engine(n)  # unknown names fail here, before any work
    if engine is not None and (why := get_engine(engine).available()):
        raise BrainsurgeonError(f"engine {engine!r} is not usable here: {why}")
    if not isinstance(prefill_tokens, int) or prefill_tokens < 2:
        raise BrainsurgeonError(f"prefill_tokens must be an integer >= 2, got {prefill_tokens!r}")
    from .hf_dir import is_hf_model

    phased = is_hf_model(model) and engine is None
    work = copy.deepcopy(model).eval()
    kinds = (nn.Linear, nn.Conv2d) + ((conv1d_class(),) if conv1d_class() is not None else ())
    layers = {n: m for n, m in work.named_modules() if type(m) in kinds}
    example = None if phased else _example_input(work, example_input, batch_size)
    inputs = _capture_inputs(work, layers, example) if example is not None else {}
    report, cache = {}, {}
    phases = {"decode": 1, "prefill": prefill_tokens}
    for name, module in layers.items():
        csr = CSR.from_dense(module.weight)
        entry = {"kind": "conv2d" if isinstance(module, nn.Conv2d) else "linear" if isinstance(module, nn.Linear) else "conv1d",
                 "shape": list(module.weight.shape), "sparsity": round(csr.sparsity, 4)}
        report[name] = entry
        why = _why_dense(module, csr.sparsity, min_sparsity, engine is not None)
        if why:
            entry.update(engine="dense", reason=why)
            continue
        if engine is not None:
            if why := get_engine(engine).supports(csr):
                entry.update(engine="dense", reason=f"{engine}: {why}")
                continue
            new = _sparse_module(module, engine)
            entry.update(engine=engine, reason="forced")
        elif phased and not isinstance(module, nn.Conv2d):
            new = _choose_phased(module, phases, _usable_engines(names, csr), entry, cache, name)
        else:
            x = inputs.get(name, None)
            new = _choose(module, x if x is not None else _stand_in_input(module, batch_size),
                          _usable_engines(names, csr), entry)
        if new is not module:
            if name == "":  # the model is itself one layer
                work = new
            else:
                _replace(work, name, new)
    if is_hf_model(work):  # decode groups, whether the engines were timed or forced
        _group_siblings(work, report)
    work.sparse_report = report
    return work


def _group_siblings(model: nn.Module, report: dict) -> None:
    """Stack the decode products of sibling SparseLinears that one forward shows reading the same input.

    Which layers share an input is read off a forward pass of the model's ``dummy_inputs`` (a few
    token ids) rather than known per architecture: q/k/v and gate/up in Llama-style blocks, q/k/v in
    OPT and BERT, whatever a model does. Only layers whose decode engine can stack (the bitmask
    engines) and that agree on it are grouped; the others keep their own products. Not timed against
    separate calls: the group reads the same bytes in fewer, longer calls.
    """
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear) and m._vector is not None
              and get_engine(m.decode_engine).stackable}
    if len(sparse) < 2 or not isinstance(getattr(model, "dummy_inputs", None), dict):
        return
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
             for name, m in sparse.items()]
    try:
        with torch.no_grad():
            model(**model.dummy_inputs)
    except Exception as e:  # noqa: BLE001 - a model that cannot run its own dummy inputs is left ungrouped
        for n in sparse:
            report[n]["decode_group"] = f"not grouped: the model's dummy_inputs did not run ({type(e).__name__}: {e})"
        return
    finally:
        for h in hooks:
            h.remove()
    buckets: dict[tuple, list[str]] = {}
    for name, x in seen.items():  # same parent, same input object, same engine: one group
        key = (name.rpartition(".")[0], id(x), sparse[name].decode_engine)
        buckets.setdefault(key, []).append(name)
    for names in buckets.values():
        if len(names) > 1:
            DecodeGroup([sparse[n] for n in names])
            for n in names:
                report[n]["decode_group"] = names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
