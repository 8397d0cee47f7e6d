"""Pruned SmolLM2-135M on CPU: decode and prefill speed, outputs and file sizes (`make bench-llm-inference`).

SmolLM2-135M-Instruct (float32; ``~/.cache/brainsurgeon/smollm2-135m-instruct``) is pruned by
``bs.prune(..., "sparsegpt")`` at 50%, 70% and 2:4 over the 210 block linears (embeddings / tied
lm_head untouched), calibrated on Jane Austen's novels, and one structured cut (variant ``ch0.3``:
fisher-mask removes 30% of the head/FFN parameters, compacted; also timed against the model before
pruning). For each pruned model, in the same run and interleaved round by round, at 1 and 2 threads:

* decode: greedy tokens/s at batch 1 over 64 new tokens with the KV cache (the prompt's prefill not
  counted), for dense torch (the pruned weights, dense kernels), ``bs.to_sparse`` and onnxruntime
  (the same weights, exported by ``export_hf_onnx``); medians over rounds;
* prefill: one forward of 512 tokens at batch 1 (median ms);
* outputs: greedy tokens of to_sparse and onnxruntime against dense torch, max |logit difference|;
* a profile per op class of one decode run (1 thread): where a token's time goes;
* sizes: the sparse directory (``bs.save``) against the dense ``save_pretrained`` directory.

Pruned models are cached as sparse directories under runs/bench/llm_inference/. Writes section
"llm-inference" of BENCHMARKS.md; raw numbers in runs/bench/llm_inference.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from _record import markdown_table, record_section
from common import CACHE

import brainsurgeon as bs
from brainsurgeon.sparse import SparseLinear
from brainsurgeon.sparse.hf_dir import export_dense, load_any
from brainsurgeon.sparse.onnx import OrtCausalLM, cache_argument, export_hf_onnx

MODEL_DIR = Path.home() / ".cache" / "brainsurgeon" / "smollm2-135m-instruct"
TEXT_DIR = Path.home() / ".cache" / "brainsurgeon" / "austen"
OUT = CACHE / "llm_inference"
NEW_TOKENS = 64
#: the criterion of the structured cut (variant "chF": a fraction F of the head/FFN parameters removed),
#: the best one-shot criterion of the structured benchmark (BENCHMARKS.md, llm-structured)
STRUCTURED_METHOD = "fisher-mask"
UNPRUNED = "unpruned dense torch"


# ----------------------------------------------------------------------------- material
def tokens(tok, n_seq: int, seq_len: int, offset_chars: int = 0) -> torch.Tensor:
    """``n_seq`` windows of ``seq_len`` tokens from the novels (sorted by name, concatenated)."""
    text = "\n\n".join(p.read_text() for p in sorted(TEXT_DIR.glob("*.txt")))
    ids = tok(text[offset_chars: offset_chars + 8 * n_seq * seq_len], return_tensors="pt").input_ids[0]
    if ids.numel() < n_seq * seq_len:
        raise SystemExit(f"not enough text in {TEXT_DIR} for {n_seq} x {seq_len} tokens")
    return ids[: n_seq * seq_len].reshape(n_seq, seq_len)


def pruned_model(dense: nn.Module, variant: str, method: str, calib: torch.Tensor) -> tuple[nn.Module, dict]:
    """The model pruned at ``variant`` ("0.5", "0.7", "2:4", "ch0.3"), from the cache or pruned now."""
    if variant.startswith("ch"):  # a structured cut: heads + FFN neurons removed and compacted
        method, kwargs = STRUCTURED_METHOD, {"structure": "channel", "sparsity": float(variant[2:]), "allocation": "global"}
    else:
        kwargs = {"structure": variant} if ":" in variant else {"sparsity": float(variant)}
    path = OUT / f"{method}-{variant.replace(':', 'of')}-n{calib.shape[0]}x{calib.shape[1]}"
    if path.exists():
        info = json.loads((path / "bench_prune.json").read_text()) if (path / "bench_prune.json").exists() else {}
        return bs.load(path), {**info, "cached": True}
    t0 = time.perf_counter()
    res = bs.prune(dense, calib, method, num_samples=calib.shape[0], batch_size=4, seed=0, **kwargs)
    info = {"method": method}
    info.update(seconds=round(time.perf_counter() - t0, 1),
                achieved_sparsity=res.report["overall"]["achieved_sparsity"])
    bs.save(res.model, path)
    (path / "bench_prune.json").write_text(json.dumps(info))
    return res.model, info


# ----------------------------------------------------------------------------- runs
@torch.no_grad()
def torch_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                 logits: list | None = None) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding by hand (prefill, then one token per call with the KV cache); per-step seconds.

    ``logits``: a list that receives every decode step's logits (the one-row products, where
    to_sparse's decode engines run), to compare against the dense kernels'.
    """
    key = cache_argument(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, toks, times = getattr(out, key), [int(out.logits[0, -1].argmax())], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[toks[-1]]]), use_cache=True, **{key: cache})
        times.append(time.perf_counter() - t0)
        cache = getattr(out, key)
        toks.append(int(out.logits[0, -1].argmax()))
        if logits is not None:
            logits.append(out.logits[0, -1].clone())
    return torch.cat([prompt, torch.tensor([toks])], dim=1), times


@torch.no_grad()
def float64_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``model``'s weights computed in float64 (a copy): the exact answer to compare roundings to."""
    exact = copy.deepcopy(model).double()
    try:
        return exact(ids).logits
    finally:
        del exact


@torch.no_grad()
def torch_prefill_ms(model: nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return (time.perf_counter() - t0) * 1e3


def ort_prefill_ms(ort_lm: OrtCausalLM, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    ort_lm.step(ids.numpy(), 0, ort_lm.empty_past())
    return (time.perf_counter() - t0) * 1e3


def profile_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Milliseconds per decoded token by op class (exclusive), from module hooks on one greedy run."""
    starts, total = {}, defaultdict(float)

    def classify(name: str, m: nn.Module) -> str | None:
        if name == "lm_head":
            return "lm_head (dense, tied embedding)"
        if isinstance(m, SparseLinear):
            return f"block linears: {m.decode_engine}"
        if isinstance(m, nn.Linear):
            return "block linears: dense"
        kind = type(m).__name__
        if kind.endswith("Attention"):
            return "attention (excl. projections)"
        if kind.endswith("MLP"):
            return "MLP activation+mul (excl. projections)"
        if kind.endswith("RMSNorm"):
            return "RMSNorm"
        if isinstance(m, nn.Embedding):
            return "embedding lookup"
        return None

    hooks, children = [], {}
    for name, m in model.named_modules():
        cls = classify(name, m)
        if cls is None:
            continue
        children[name] = [c for c, cm in m.named_modules() if c and classify(f"{name}.{c}", cm)]

        def pre(mod, args, name=name):
            starts[name] = time.perf_counter()

        def post(mod, args, out, name=name, cls=cls):
            total[(name, cls)] += time.perf_counter() - starts[name]

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        t0 = time.perf_counter()
        _, step_times = torch_greedy(model, prompt, new_tokens)
        wall = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    inclusive = {name: t for (name, _), t in total.items()}
    by_class = defaultdict(float)
    for (name, cls), t in total.items():
        by_class[cls] += t - sum(inclusive.get(f"{name}.{c}", 0.0) for c in children[name])
    by_class["other (python, cache, rotary, sampling)"] = wall - sum(by_class.values())
    steps = new_tokens  # the prefill call is included in the hooks: report per generated token
    return {k: round(v * 1e3 / steps, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


# ----------------------------------------------------------------------------- one variant
def run_variant(variant, model, info, prompt, prefill_ids, args, log, unpruned=None) -> dict:
    """``unpruned``: the model before pruning, timed in the same rounds (for a structured cut, whose
    speed-up is over the unpruned model rather than over its own weights in dense kernels)."""
    row = {"variant": variant, **info}
    sparse_dir, dense_dir = OUT / "tmp" / f"sparse-{variant}", OUT / "tmp" / f"dense-{variant}"
    for d in (sparse_dir, dense_dir):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    save = bs.save(model, sparse_dir)
    export_dense(model, dense_dir)
    row["size"] = {"sparse_dir_bytes": dir_bytes(sparse_dir), "dense_dir_bytes": dir_bytes(dense_dir),
                   "sparse_weights_bytes": weights_bytes(sparse_dir), "dense_weights_bytes": weights_bytes(dense_dir),
                   "bytes_per_nonzero": round(save["bytes_per_nonzero"], 3), "encodings": sorted(set(save["encodings"].values()))}
    row["size"]["ratio"] = row["size"]["sparse_dir_bytes"] / row["size"]["dense_dir_bytes"]
    onnx_path = OUT / "tmp" / f"{variant.replace(':', 'of')}.onnx"
    t0 = time.perf_counter()
    row["onnx"] = {k: v for k, v in export_hf_onnx(model, onnx_path).items() if k != "inputs"}
    log(f"{variant}: sizes {row['size']['ratio']:.3f}, onnx exported in {time.perf_counter() - t0:.0f} s")
    row["threads"] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        fast = bs.to_sparse(model, prefill_tokens=args.prefill)
        convert_s = time.perf_counter() - t0
        ort_lm = OrtCausalLM(onnx_path, model.config, threads=threads)
        # the first round keeps every decode step's logits of both torch runs, to compare them
        steps = {"dense torch": [], "bs.to_sparse": []}
        impls = {"dense torch": lambda: torch_greedy(model, prompt, NEW_TOKENS + 1, steps["dense torch"] if r == 0 else None),
                 "bs.to_sparse": lambda: torch_greedy(fast, prompt, NEW_TOKENS + 1, steps["bs.to_sparse"] if r == 0 else None),
                 "onnxruntime": lambda: ort_lm.greedy(prompt, NEW_TOKENS + 1)}
        prefills = {"dense torch": lambda: torch_prefill_ms(model, prefill_ids),
                    "bs.to_sparse": lambda: torch_prefill_ms(fast, prefill_ids),
                    "onnxruntime": lambda: ort_prefill_ms(ort_lm, prefill_ids)}
        if unpruned is not None:
            impls[UNPRUNED] = lambda: torch_greedy(unpruned, prompt, NEW_TOKENS + 1)
            prefills[UNPRUNED] = lambda: torch_prefill_ms(unpruned, prefill_ids)
        tps, pre, outs = defaultdict(list), defaultdict(list), {}
        warm = {"dense torch": lambda: torch_greedy(model, prompt, 3), "bs.to_sparse": lambda: torch_greedy(fast, prompt, 3),
                "onnxruntime": lambda: ort_lm.greedy(prompt, 3), UNPRUNED: lambda: torch_greedy(unpruned, prompt, 3)}
        for name in impls:  # warm-up (numba compile/cache load, onnxruntime arena): short runs
            warm[name]()
            prefills[name]()
        for r in range(args.rounds):
            for name in impls:  # interleaved: each round runs every implementation once
                toks, times = impls[name]()
                outs.setdefault(name, toks)
                tps[name].append(len(times) / sum(times))
                pre[name].append(prefills[name]())
        with torch.no_grad():
            ref_logits = model(outs["dense torch"]).logits
            sparse_diff = float((fast(outs["dense torch"]).logits - ref_logits).abs().max())  # prefill engines
            # decode engines: every step's logits of the first round (same tokens: compared step by step)
            decode_diff = max(float((a - b).abs().max()) for a, b in zip(steps["dense torch"], steps["bs.to_sparse"]))
            ort_logits, _ = ort_lm.step(outs["dense torch"].numpy(), 0, ort_lm.empty_past())
            ort_diff = float((torch.from_numpy(ort_logits) - ref_logits).abs().max())
            # float32 against float32 says how far apart two roundings are; float64 says which is closer
            exact = float64_logits(model, outs["dense torch"])
            f64_error = {"dense torch": float((ref_logits.double() - exact).abs().max()),
                         "bs.to_sparse": float((fast(outs["dense torch"]).logits.double() - exact).abs().max()),
                         "onnxruntime": float((torch.from_numpy(ort_logits).double() - exact).abs().max())}
        engines = defaultdict(int)
        for entry in fast.sparse_report.values():
            e = entry["engine"]
            engines[f"{e['decode']}/{e['prefill']}" if isinstance(e, dict) else e] += 1
        groups = {tuple(e["decode_group"]) for e in fast.sparse_report.values() if isinstance(e.get("decode_group"), list)}
        res = {"convert_s": round(convert_s, 1), "engines (decode/prefill): layers": dict(engines),
               "decode_groups": len(groups), "decode_group_layers": sum(len(g) for g in groups),
               "decode_tokens_per_s": {k: round(statistics.median(v), 2) for k, v in tps.items()},
               "decode_rounds": {k: [round(x, 2) for x in v] for k, v in tps.items()},
               "prefill_ms": {k: round(statistics.median(v), 1) for k, v in pre.items()},
               "same_greedy_tokens": {k: bool(torch.equal(outs[k], outs["dense torch"])) for k in ("bs.to_sparse", "onnxruntime")},
               "max_abs_logit_diff": {"bs.to_sparse": max(sparse_diff, decode_diff), "onnxruntime": ort_diff,
                                      "bs.to_sparse decode steps": decode_diff, "bs.to_sparse full forward": sparse_diff},
               "full_forward_error_vs_float64": f64_error}
        if args.deepsparse:
            res["deepsparse_decode_step"] = deepsparse_peer(args, variant, onnx_path, ort_lm, prompt, threads)
            log(f"{variant} @ {threads}: deepsparse {res['deepsparse_decode_step']}")
        if threads == 1 and args.profile:
            res["profile_ms_per_token"] = {"dense torch": profile_decode(model, prompt, NEW_TOKENS + 1),
                                           "bs.to_sparse": profile_decode(fast, prompt, NEW_TOKENS + 1)}
        row["threads"][threads] = res
        log(f"{variant} @ {threads} thread(s): {res['decode_tokens_per_s']} tok/s, prefill {res['prefill_ms']} ms, "
            f"tokens same {res['same_greedy_tokens']}, logit diff {res['max_abs_logit_diff']}")
        del fast, ort_lm
    return row


# Run by the throwaway venv's Python (deepsparse needs its own numpy/onnx): one decode step of our ONNX
# at a fixed past length (deepsparse compiles static shapes), median ms, and its logits for comparison.
DEEPSPARSE_RUNNER = r"""
import json, statistics, sys, time
import numpy as np
from deepsparse import Engine
onnx_path, feed_path, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feed = dict(np.load(feed_path))
names = json.loads(sys.argv[5])
inputs = [feed[n] for n in names]
t0 = time.perf_counter()
engine = Engine(model=onnx_path, batch_size=1, num_cores=threads, input_shapes=[list(a.shape) for a in inputs])
compile_s = time.perf_counter() - t0
out = engine.run(inputs)
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); engine.run(inputs); times.append((time.perf_counter() - t0) * 1e3)
np.save(feed_path + ".logits.npy", out[0])
print(json.dumps({"ms": statistics.median(times), "compile_s": compile_s}))
"""


def deepsparse_peer(args, variant: str, onnx_path: Path, ort_lm: OrtCausalLM, prompt: torch.Tensor, threads: int) -> dict:
    """One decode step after the prompt (past = prompt length): deepsparse against onnxruntime, same ONNX and inputs."""
    import numpy as np

    py = Path(args.deepsparse_python)
    if not py.exists():
        return {"error": f"no throwaway venv at {py} (python3.11 -m venv; pip install deepsparse)"}
    logits, past = ort_lm.step(prompt.numpy(), 0, ort_lm.empty_past())
    next_id = np.array([[int(logits[0, -1].argmax())]])
    pos = np.array([[prompt.shape[1]]], dtype=np.int64)
    names = ort_lm.names
    feed = dict(zip(names, [next_id.astype(np.int64), pos, *past]))
    feed_path = OUT / "tmp" / f"ds-feed-{variant.replace(':', 'of')}.npz"
    np.savez(feed_path, **feed)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        ref = ort_lm.session.run(None, feed)[0]
        times.append((time.perf_counter() - t0) * 1e3)
    import shutil

    ds_onnx = onnx_path.with_suffix(".deepsparse.onnx")  # deepsparse rewrites the file it is given (static shapes)
    shutil.copyfile(onnx_path, ds_onnx)
    proc = subprocess.run([str(py), "-c", DEEPSPARSE_RUNNER, str(ds_onnx), str(feed_path), str(threads), "20",
                           json.dumps(names)], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"error": (tail or ["?"])[-1][:300]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ds_logits = np.load(str(feed_path) + ".logits.npy")
    res.update(onnxruntime_ms=statistics.median(times), max_abs_logit_diff=float(np.abs(ds_logits - ref).max()))
    return res


# ----------------------------------------------------------------------------- report
def deepsparse_line(args) -> str:
    """Which deepsparse the throwaway venv holds, or why it is not measured (one line)."""
    py = Path(args.deepsparse_python)
    if not py.exists():
        return (f"deepsparse: not measured: no venv at {py}. deepsparse 1.9.0 (the newest, PyPI) is an "
                "end-of-life source package whose build stops with a message; 1.8.0 has wheels for Python 3.11")
    probe = subprocess.run([str(py), "-c", "import deepsparse; print(deepsparse.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode:
        return f"deepsparse: not measured: it does not import ({(probe.stderr.strip().splitlines() or ['?'])[-1][:200]})"
    return f"deepsparse {probe.stdout.strip()}"


def _kernel_line() -> str:
    from brainsurgeon.sparse import native

    if native.load() is None:
        return f"not built ({native.error()})"
    return f"{native.isa()} build, OpenMP runtime {native.openmp_runtime()}"


def _load_range(rows: list[dict]) -> str:
    loads = [r["load"] for r in rows if r.get("load") is not None]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def _label(row: dict) -> str:
    v = row["variant"]
    return f"{v} ({row.get('method', '?')}: {float(v[2:]):.0%} of the head/FFN parameters removed)" if v.startswith("ch") else v


def _logit_cells(res: dict) -> list[str]:
    """Max |logit diff| against dense torch (decode steps, full forward), then each one's error against float64."""
    diff, f64 = res["max_abs_logit_diff"], res.get("full_forward_error_vs_float64", {})
    if "bs.to_sparse decode steps" not in diff:  # a run recorded before the split
        return [f"{diff['bs.to_sparse']:.1e}", "-", "-", "-"]
    return [f"{diff['bs.to_sparse decode steps']:.1e}", f"{diff['bs.to_sparse full forward']:.1e}",
            *(f"{f64[k]:.1e}" if k in f64 else "-" for k in ("dense torch", "bs.to_sparse"))]


def section(rows: list[dict], args, ds_line: str) -> str:
    lines = [f"SmolLM2-135M-Instruct (float32, 30 layers, hidden 576, vocab 49152, tied embeddings) pruned over its "
             f"210 block linears; calibration {args.calib_samples} x {args.calib_len} tokens of Austen; prompt "
             f"{args.prompt} tokens, {NEW_TOKENS} decoded tokens at batch 1 with the KV cache (tokens/s = "
             f"{NEW_TOKENS} / the summed time of the {NEW_TOKENS} decode calls); prefill = one forward of "
             f"{args.prefill} tokens. Medians of {args.rounds} interleaved rounds (dense torch, bs.to_sparse and "
             "onnxruntime run one after another in each round). 1-minute load average of the machine (2 cores) "
             f"during the run: {_load_range(rows)}. Logit diff: the max |difference| from dense torch on the same "
             "weights, over every decode step's logits (the one-row products, where the decode engines run) and "
             "over one full forward of the prompt and the decoded tokens (the prefill engines); then that full "
             "forward's max |difference| from the same weights computed in float64, for dense torch and for "
             f"to_sparse: each one's own rounding error. Bitmask kernels: {_kernel_line()}."]
    table = []
    for r in rows:
        for t, res in r["threads"].items():
            d = res["decode_tokens_per_s"]
            p = res["prefill_ms"]
            table.append([_label(r), r.get("method", "?"), t, d["dense torch"], d["bs.to_sparse"], d["onnxruntime"],
                          f"{d['bs.to_sparse'] / d['dense torch']:.2f}x", p["dense torch"], p["bs.to_sparse"], p["onnxruntime"],
                          "yes" if all(res["same_greedy_tokens"].values()) else f"{res['same_greedy_tokens']}",
                          *_logit_cells(res)])
    partial = [r["variant"] for r in rows if len(r["threads"]) < len(args.threads)]
    if partial:
        lines.append(f"\nMeasured at fewer thread counts: {', '.join(partial)} (on the shared cores a 2-thread run took "
                     "~15 minutes per variant, OpenMP spin-waits included; `--threads 1` was used for them).")
    all_dense = [f"{r['variant']} at {t}" for r in rows for t, res in r["threads"].items()
                 if set(res["engines (decode/prefill): layers"]) <= {"dense/dense", "dense"}
                 and not r["variant"].startswith("ch")]  # a structured cut has no sparse layer to time
    if all_dense:
        lines.append(f"\nWhere `to_sparse` measured dense fastest for every layer ({', '.join(all_dense)} thread(s)), "
                     "its model runs the same modules as dense torch: the two columns differ by measurement noise only.")
    lines += ["", markdown_table(["pruned", "method", "threads", "decode tok/s dense torch", "bs.to_sparse", "onnxruntime",
                                  "to_sparse / dense", "prefill ms dense", "to_sparse", "onnxruntime",
                                  "same greedy tokens", "logit diff: decode steps", "full forward",
                                  "full forward vs float64: dense torch", "to_sparse"], table)]
    cuts = [[_label(r), t, res["decode_tokens_per_s"][UNPRUNED], res["decode_tokens_per_s"]["dense torch"],
             res["decode_tokens_per_s"]["bs.to_sparse"],
             f"{res['decode_tokens_per_s']['dense torch'] / res['decode_tokens_per_s'][UNPRUNED]:.2f}x",
             res["prefill_ms"][UNPRUNED], res["prefill_ms"]["dense torch"],
             f"{res['prefill_ms'][UNPRUNED] / res['prefill_ms']['dense torch']:.2f}x"]
            for r in rows for t, res in r["threads"].items() if UNPRUNED in res["decode_tokens_per_s"]]
    if cuts:
        lines += ["", "The structured cut against the model before pruning, timed in the same rounds (its layers are "
                  "smaller, not sparse: to_sparse keeps them dense):", "",
                  markdown_table(["cut", "threads", "decode tok/s unpruned", "pruned, dense torch", "pruned, bs.to_sparse",
                                  "decode speed-up", "prefill ms unpruned", "pruned", "prefill speed-up"], cuts)]
    sizes = [[_label(r), r["size"]["sparse_dir_bytes"] / 2**20, r["size"]["dense_dir_bytes"] / 2**20,
              f"{100 * r['size']['ratio']:.1f}%", r["size"]["bytes_per_nonzero"], ", ".join(r["size"]["encodings"])]
             for r in rows]
    lines += ["", "Directory sizes (all files; the tied 49152 x 576 embedding is stored once, dense, its float32 byte "
              "planes deflated where that pays, as every float array of the sparse directory: lossless, format "
              "version 3; the dense directory is save_pretrained's):", "",
              markdown_table(["pruned", "sparse dir MiB", "dense save_pretrained MiB", "ratio", "bytes/non-zero",
                              "encodings"], sizes)]
    for r in rows:
        for t, res in r["threads"].items():
            lines.append(f"\nEngines chosen, {r['variant']} at {t} thread(s) (layers per decode/prefill engine): "
                         + ", ".join(f"{k}: {v}" for k, v in res["engines (decode/prefill): layers"].items())
                         + (f"; {res['decode_group_layers']} of them in {res['decode_groups']} decode groups (siblings "
                            "reading one input, q/k/v and gate/up: one stacked product per token)"
                            if res.get("decode_groups") else ""))
    for r in rows:
        prof = (r["threads"].get(1) or r["threads"].get("1") or {}).get("profile_ms_per_token")  # "1" after JSON
        if prof:
            keys = list(dict.fromkeys([*prof["dense torch"], *prof["bs.to_sparse"]]))
            lines += ["", f"Where a decoded token's time goes, {r['variant']}, 1 thread (ms per token, exclusive, module hooks):", "",
                      markdown_table(["op class", "dense torch", "bs.to_sparse"],
                                     [[k, prof["dense torch"].get(k, "-"), prof["bs.to_sparse"].get(k, "-")] for k in keys])]
    ds = [[r["variant"], t, res["deepsparse_decode_step"].get("onnxruntime_ms"), res["deepsparse_decode_step"].get("ms"),
           res["deepsparse_decode_step"].get("max_abs_logit_diff"), res["deepsparse_decode_step"].get("error", "")]
          for r in rows for t, res in r["threads"].items() if "deepsparse_decode_step" in res]
    if ds:
        lines += ["", f"deepsparse as a peer ({ds_line}; a throwaway Python 3.11 venv): one decode step after the "
                  f"{args.prompt}-token prompt on the same ONNX and inputs (deepsparse compiles static shapes, so "
                  "no 64-token loop), median ms:", "",
                  markdown_table(["pruned", "threads", "onnxruntime ms", "deepsparse ms", "max logit diff", "error"], ds)]
    else:
        lines += ["", ds_line]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="0.5,0.7,2:4,ch0.3")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--deepsparse-python", default="/tmp/dsvenv/bin/python",
                    help="a Python 3.11 venv with deepsparse (1.8.0: 1.9.0 does not build); absent: not measured")
    ap.add_argument("--no-deepsparse", dest="deepsparse", action="store_false")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the stored rows of variants not run now (runs/bench/llm_inference.json)")
    ap.add_argument("--from-json", action="store_true",
                    help="write the section from runs/bench/llm_inference.json (the variants measured so far)")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.from_json:
        rows = json.loads((CACHE / "llm_inference.json").read_text())
        text = section(rows, args, deepsparse_line(args))
        print(text)
        if not args.no_record:
            record_section("llm-inference", "Pruned SmolLM2-135M: sparse CPU inference, ONNX and file sizes",
                           "make bench-llm-inference", text)
        return
    if not (MODEL_DIR / "config.json").exists():
        raise SystemExit(f"{MODEL_DIR} not found: write SmolLM2-135M-Instruct there first (see benchmarks/llm.py)")
    from transformers import AutoTokenizer

    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    dense = load_any(MODEL_DIR)
    calib = tokens(tok, args.calib_samples, args.calib_len)
    prompt = tokens(tok, 1, args.prompt, offset_chars=2_000_000)
    prefill_ids = tokens(tok, 1, args.prefill, offset_chars=2_100_000)
    OUT.mkdir(parents=True, exist_ok=True)
    rows, kept = [], []
    if args.merge and (CACHE / "llm_inference.json").exists():
        kept = [r for r in json.loads((CACHE / "llm_inference.json").read_text())
                if r["variant"] not in args.variants.split(",")]
    for variant in args.variants.split(","):
        torch.set_num_threads(1)
        model, info = pruned_model(dense, variant, args.method, calib)
        log(f"{variant}: {info}")
        rows.append(run_variant(variant, model, info, prompt, prefill_ids, args, log,
                                unpruned=dense if variant.startswith("ch") else None))
        rows[-1]["load"] = os.getloadavg()[0]
        (CACHE / "llm_inference.json").write_text(json.dumps(kept + rows, indent=1, default=str))
    rows = kept + rows
    text = section(rows, args, deepsparse_line(args))
    print(text)
    if not args.no_record:
        record_section("llm-inference", "Pruned SmolLM2-135M: sparse CPU inference, ONNX and file sizes",
                       "make bench-llm-inference", text)


if __name__ == "__main__":
    main()
