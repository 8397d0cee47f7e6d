"""SmolLM2-135M pruned on Jane Austen (`make bench-llm`; material from `make prepare-llm`).

Protocol: 128 calibration windows of 512 tokens (seed 0) from five novels (Sense and Sensibility,
Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey); perplexity on the first 40
non-overlapping 512-token windows of the held-back sixth, Persuasion (``bs.text.perplexity_of_ids``:
exp of the mean NLL of the 511 predicted tokens per window, float64 sums). Every linear of the 30
decoder layers is pruned (q, k, v, o, gate, up, down; embeddings and the tied lm_head stay dense).

Cells: dense; brainsurgeon methods x sparsities {50%, 2:4, 4:8, 60%, 70%} x allocations {uniform,
global, owl} (N:M only uniform; a method named ``sparsegpt+ec`` runs sparsegpt with
``error_correction=True``, each layer fitted to the dense network's outputs; ``sparsegpt+bf16`` with
``compute_dtype="bfloat16"``: the calibration forwards in a bfloat16 copy of each block); peers on the same tokens: ``ref-sparsegpt`` (the unmodified
``SparseGPT`` class and ``llama_sequential`` driver of IST-DASLab/sparsegpt; adaptation below) and
``llmc-sparsegpt`` / ``llmc-wanda`` (llm-compressor's ``SparseGPTModifier`` /
``WandaPruningModifier`` through ``oneshot``, in its own venv); ``--peers ref-sparsegpt+bf16`` runs
the same reference on the model cast to bfloat16 (as it runs a half-precision checkpoint: forwards in
bfloat16, H and solves in float32; evaluated in float32), the like-for-like peer of
``sparsegpt+bf16``. Each cell runs in a subprocess:
its wall time of the pruning call, the peak RSS of the pruning call (``/proc/self/clear_refs`` reset
before the call, ``VmHWM`` after; the model's weights are read once after loading, so that they are
resident before the call: cells recorded before 2026-11-30 12:00 did not, and their increase counts
part of the model) and of the whole subprocess (``getrusage``). Finished cells are kept in
``runs/bench/llm.json``; a rerun adds the missing cells and rewrites the BENCHMARKS.md section.
``--jobs N`` runs N cells at once (a brainsurgeon cell and its reference run side by side, under the
same load).

Reference SparseGPT, what is changed to run it here (its files are not edited; they are imported
from the cache ``make prepare-llm`` exported them to): ``torch.cuda.synchronize`` is replaced by a
no-op (CPU only) and ``dev = cpu``; ``llama.args`` is set to the driver's defaults with
``nsamples`` = the calibration windows and the cell's sparsity/N:M (no ``--true-sequential``, ``percdamp=0.01``,
``blocksize=128``); ``model.seqlen = 512``; its dataloader is our calibration windows as ``(ids,)`` tuples.
Transformers 5 decoder layers need the rotary ``position_embeddings`` that the 2023 driver does not
pass (it calls ``layer(x, attention_mask=mask)``): ``LlamaDecoderLayer.forward`` is wrapped to
compute them from the model's own ``rotary_emb`` when they are missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

CACHE = Path(os.environ.get("BRAINSURGEON_CACHE", Path.home() / ".cache" / "brainsurgeon"))
MODEL = CACHE / "smollm2-135m-instruct"
AUSTEN = CACHE / "austen"
REF = CACHE / "ref-sparsegpt"
LLMC_PY = CACHE / "venv-llmcompressor" / "bin" / "python"
WORK = CACHE / "llm-bench"
STORE = ROOT / "runs" / "bench" / "llm.json"
CALIBRATION = ["sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey"]
HELD_OUT = "persuasion"
NUM_SAMPLES, SEQ_LEN, EVAL_WINDOWS, SEED = 128, 512, 40, 0  # the protocol; --num-samples/--eval-windows
METHODS = ["sparsegpt", "wanda", "magnitude"]
SPARSITIES = ["0.5", "2:4", "4:8", "0.6", "0.7"]
ALLOCATIONS = ["uniform", "global", "owl"]
PEERS = ["ref-sparsegpt", "llmc-sparsegpt", "llmc-wanda"]
# the cells that matter most run first (the machine is slow and shared)
PRIORITY = [
    ("dense", "-", "-", "-"),
    ("brainsurgeon", "sparsegpt", "0.5", "uniform"), ("ref-sparsegpt", "sparsegpt", "0.5", "uniform"),
    ("brainsurgeon", "sparsegpt", "2:4", "uniform"), ("ref-sparsegpt", "sparsegpt", "2:4", "uniform"),
    ("brainsurgeon", "sparsegpt", "0.7", "uniform"), ("ref-sparsegpt", "sparsegpt", "0.7", "uniform"),
    ("brainsurgeon", "wanda", "0.5", "uniform"), ("brainsurgeon", "magnitude", "0.5", "uniform"),
    ("brainsurgeon", "sparsegpt", "0.7", "owl"), ("brainsurgeon", "sparsegpt", "0.5", "owl"),
    ("brainsurgeon", "sparsegpt", "0.7", "global"), ("brainsurgeon", "sparsegpt", "0.5", "global"),
    ("llmc-sparsegpt", "sparsegpt", "0.5", "uniform"), ("llmc-wanda", "wanda", "0.5", "uniform"),
]


def set_protocol(num_samples: int, eval_windows: int) -> None:
    """A reduced protocol (fewer calibration windows / evaluation windows) gets its own store and
    section, whose title says so: it never mixes with the full protocol's cells."""
    global NUM_SAMPLES, EVAL_WINDOWS, STORE
    NUM_SAMPLES, EVAL_WINDOWS = num_samples, eval_windows
    if not full_protocol():
        STORE = ROOT / "runs" / "bench" / f"llm_{NUM_SAMPLES}x{SEQ_LEN}_w{EVAL_WINDOWS}.json"


def full_protocol() -> bool:
    return (NUM_SAMPLES, EVAL_WINDOWS) == (128, 40)


def log(msg: str) -> None:
    print(f"[bench-llm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cell_key(impl: str, method: str, sparsity: str, allocation: str) -> str:
    return "dense" if impl == "dense" else f"{impl}|{method}|{sparsity}|{allocation}"


def parse_sparsity(s: str) -> dict:
    """'0.5' -> unstructured 50%; '2:4' -> the N:M structure (its sparsity is 1 - N/M)."""
    if ":" in s:
        n, m = (int(v) for v in s.split(":"))
        return {"structure": s, "sparsity": 1 - n / m, "n": n, "m": m}
    return {"structure": "unstructured", "sparsity": float(s), "n": 0, "m": 0}


# ----------------------------------------------------------------------------- tokens (parent)
def tokens_file() -> Path:
    """Calibration windows and evaluation tokens, made once (safetensors, outside the repository)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from brainsurgeon import text as bstext

    path = WORK / f"tokens_{NUM_SAMPLES}x{SEQ_LEN}_s{SEED}_w{EVAL_WINDOWS}.safetensors"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(MODEL)
    calib_ids = bstext.tokenize(tok, [AUSTEN / f"{n}.txt" for n in CALIBRATION])
    calib = bstext.sample_windows(calib_ids, NUM_SAMPLES, SEQ_LEN, SEED)
    eval_ids = bstext.tokenize(tok, AUSTEN / f"{HELD_OUT}.txt")[: EVAL_WINDOWS * SEQ_LEN]
    if eval_ids.numel() < EVAL_WINDOWS * SEQ_LEN:
        raise SystemExit(f"{HELD_OUT} has fewer than {EVAL_WINDOWS} windows of {SEQ_LEN} tokens")
    tmp = path.with_suffix(".tmp")
    save_file({"calibration": calib.contiguous(), "evaluation": eval_ids.contiguous()}, str(tmp))
    os.replace(tmp, path)
    log(f"tokens: {calib_ids.numel()} calibration tokens -> {tuple(calib.shape)} windows; {eval_ids.numel()} evaluation tokens")
    return path


# ----------------------------------------------------------------------------- inside a cell
def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


class CallMeter:
    """Wall time and peak RSS of one call (the RSS before it, VmHWM after a reset)."""

    def __enter__(self):
        import gc

        gc.collect()
        self.rss_before = _proc_status("VmRSS")
        _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = _proc_status("VmHWM")
        return False

    def result(self) -> dict:
        return {"prune_s": self.seconds, "rss_before_mb": self.rss_before / 2**20, "call_peak_mb": self.peak / 2**20,
                "call_increase_mb": (self.peak - self.rss_before) / 2**20}


def load_tokens(path: Path):
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["calibration"], t["evaluation"]


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, use_safetensors=True).eval()
    resident(model)
    return model


def resident(model) -> None:
    """Read every weight once: transformers maps the safetensors files, and pages nobody has read
    are not resident, so without this the first pass over the weights inside the measured call
    (brainsurgeon's working copy, the reference's first forward) would count part of the user's own
    model (measured: about 450 MB of SmolLM2) as the call's memory."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            float(p.sum())


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def evaluate(model, eval_ids) -> dict:
    from brainsurgeon import text as bstext

    t0 = time.perf_counter()
    r = bstext.perplexity_of_ids(model, eval_ids, SEQ_LEN, EVAL_WINDOWS)
    linears = [m for n, m in model.named_modules() if ".layers." in n and type(m).__name__ == "Linear"]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return {"perplexity": r["perplexity"], "eval_s": time.perf_counter() - t0,
            "zeros": zeros / sum(m.weight.numel() for m in linears)}


def roundtrip(model, eval_ids) -> bool:
    """save_pretrained, reload in plain transformers: identical logits on one window."""
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=WORK) as d:
        model.save_pretrained(d)
        again = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        x = eval_ids[:SEQ_LEN][None]
        with torch.no_grad():
            return bool(torch.equal(model(x).logits, again(x).logits))


def run_brainsurgeon(cell: dict, calib, eval_ids) -> dict:
    import brainsurgeon as bs

    model = load_model()
    sp = parse_sparsity(cell["sparsity"])
    kwargs = {"structure": sp["structure"], "allocation": cell["allocation"], "seed": SEED, "progress": False,
              "num_samples": NUM_SAMPLES}
    method, _, variant = cell["method"].partition("+")  # "sparsegpt+ec": error correction towards the dense outputs
    if variant == "ec":
        kwargs["error_correction"] = True
    elif variant == "bf16":  # the calibration forwards in a bfloat16 copy of each block (AMX)
        kwargs["compute_dtype"] = "bfloat16"
    elif variant == "fisher":  # obd's Monte-Carlo Fisher diagonal (the exact GGN of a 49152-way output is refused)
        kwargs["curvature"] = "fisher"
    elif variant:
        raise SystemExit(f"unknown method variant {variant!r} (known: +ec, +bf16, +fisher)")
    with CallMeter() as meter:
        res = bs.prune(model, calib, method=method, sparsity=None if sp["n"] else sp["sparsity"], **kwargs)
    out = meter.result()
    out["model_mb"] = model_bytes(model) / 2**20
    out["numerics"] = res.report.get("numerics")
    del model
    out.update(evaluate(res.model, eval_ids))
    if cell.get("roundtrip"):
        out["roundtrip_identical"] = roundtrip(res.model, eval_ids)
    return out


def _patch_decoder_layer(model) -> None:
    """Transformers 5 decoder layers need position_embeddings; the 2023 driver does not pass them."""
    import torch

    layer_cls = type(model.model.layers[0])
    rotary = model.model.rotary_emb
    original = layer_cls.forward

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        if position_embeddings is None:
            pos = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            position_embeddings = rotary(hidden_states, position_ids=pos)
        return original(self, hidden_states, *args, position_embeddings=position_embeddings, **kwargs)

    layer_cls.forward = forward


def run_ref_sparsegpt(cell: dict, calib, eval_ids) -> dict:
    import types

    import torch

    torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it after each layer; CPU only
    sys.path.insert(0, str(REF))
    import llama as ref_llama  # the unmodified driver (imports its sparsegpt, modelutils, quant)

    sp = parse_sparsity(cell["sparsity"])
    ref_llama.args = types.SimpleNamespace(
        nsamples=NUM_SAMPLES, true_sequential=False, minlayer=-1, maxlayer=1000, prune_only="", invert=False,
        wbits=16, sparsity=sp["sparsity"] if not sp["n"] else 0, prunen=sp["n"], prunem=sp["m"], percdamp=0.01,
        blocksize=128,
    )
    model = load_model()
    bf16 = cell["impl"].endswith("+bf16")
    if bf16:  # the model in bfloat16, as the reference runs a half-precision checkpoint (its solves in float32)
        model = model.to(torch.bfloat16)
    model.seqlen = SEQ_LEN
    _patch_decoder_layer(model)
    loader = [(calib[i:i + 1],) for i in range(calib.shape[0])]
    with CallMeter() as meter:
        ref_llama.llama_sequential(model, loader, torch.device("cpu"))
    out = meter.result()
    out["model_mb"] = model_bytes(model) / 2**20
    if bf16:  # evaluated like every cell, in float32 (its weights as the reference left them, bfloat16 values)
        model = model.float()
    out.update(evaluate(model, eval_ids))
    return out


def run_dense(cell: dict, calib, eval_ids) -> dict:
    model = load_model()
    out = {"model_mb": model_bytes(model) / 2**20}
    out.update(evaluate(model, eval_ids))
    return out


LLMC_SCRIPT = r'''
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[5]))
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.obcq import SparseGPTModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
model_dir, tokens, kind, structure, _, sparsity, out = sys.argv[1:8]
calib = load_file(tokens)["calibration"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
with torch.no_grad():  # every weight read once: its pages resident before the measured call (see resident())
    for p in model.parameters():
        float(p.sum())
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
cls = SparseGPTModifier if kind == "sparsegpt" else WandaPruningModifier
mod = cls(sparsity=float(sparsity), mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
def status(f):
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith(f + ":"):
            return int(l.split()[1]) * 1024
rss = status("VmRSS"); Path("/proc/self/clear_refs").write_text("5"); t0 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False, pipeline="sequential")
secs = time.perf_counter() - t0; peak = status("VmHWM")
tied = getattr(model.config, "tie_word_embeddings", False)  # one tensor: saved once, as the embedding
save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}, out)
import resource
print("LLMC " + json.dumps({"llmc_process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "prune_s": secs, "rss_before_mb": rss / 2**20, "call_peak_mb": peak / 2**20,
                           "call_increase_mb": (peak - rss) / 2**20}))
'''


def run_llmc(cell: dict, calib, eval_ids, tokens: Path, threads: int) -> dict:
    """llm-compressor in its own venv; its pruned weights are evaluated here with the same code."""
    import torch
    from safetensors.torch import load_file

    if not LLMC_PY.exists():
        raise RuntimeError(f"no llm-compressor venv at {LLMC_PY.parent.parent}: run `make prepare-llm`")
    sp = parse_sparsity(cell["sparsity"])
    structure = f"{sp['n']}:{sp['m']}" if sp["n"] else "0:0"
    kind = cell["impl"].split("-", 1)[1]
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        weights = Path(d) / "pruned.safetensors"
        script = Path(d) / "llmc_cell.py"
        script.write_text(LLMC_SCRIPT)
        cmd = [str(LLMC_PY), str(script), str(MODEL), str(tokens), kind, structure, str(threads), str(sp["sparsity"]), str(weights)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("LLMC ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"llm-compressor exited {proc.returncode}: {tail}")
        out = json.loads(lines[-1][5:])
        model = load_model()
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"llm-compressor's weights do not fit the model: missing {missing}, unexpected {unexpected}")
    out["model_mb"] = model_bytes(model) / 2**20
    with torch.no_grad():
        out.update(evaluate(model, eval_ids))
    return out


STOP = WORK / "STOP"  # touch it to let the running cells finish and start no new one


def child(cell: dict, tokens: Path, threads: int) -> None:
    import torch

    if STOP.exists():
        raise SystemExit(f"not started: {STOP} exists")

    torch.set_num_threads(threads)
    set_protocol(cell["num_samples"], cell["eval_windows"])
    calib, eval_ids = load_tokens(tokens)
    impl = cell["impl"]
    if impl == "dense":
        out = run_dense(cell, calib, eval_ids)
    elif impl == "brainsurgeon":
        out = run_brainsurgeon(cell, calib, eval_ids)
    elif impl in ("ref-sparsegpt", "ref-sparsegpt+bf16"):
        out = run_ref_sparsegpt(cell, calib, eval_ids)
    else:
        out = run_llmc(cell, calib, eval_ids, tokens, threads)
    import resource

    # the whole subprocess' peak RSS (for llm-compressor: this evaluating process; its own is in the cell)
    out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("CELL " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- parent
def run_cell(cell: dict, tokens: Path, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(cell), "--tokens", str(tokens),
           "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [line for line in stdout.splitlines() if line.startswith("CELL ")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    out = json.loads(lines[-1][5:])
    out["cell_s"] = wall
    return out


def load_store() -> dict:
    return json.loads(STORE.read_text()) if STORE.exists() else {"cells": {}}


def save_store(store: dict) -> None:
    STORE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STORE.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1))
    os.replace(tmp, STORE)


def _owl_capable(method: str) -> bool:
    """OWL re-weights a layer-wise method's per-layer sparsities (obc, sparsegpt, wanda): bs.prune
    refuses it for the others, so such cells are not planned (``sparsegpt+ec`` -> sparsegpt)."""
    from brainsurgeon.registry import get_method

    return "owl" in getattr(get_method(method.split("+")[0]), "allocations", ())


def plan(args) -> list[tuple[str, str, str, str]]:
    cells = [c for c in PRIORITY]
    for method in args.methods:
        for s in args.sparsities:
            for alloc in args.allocations:
                if (":" in s and alloc != "uniform") or (alloc == "owl" and not _owl_capable(method)):
                    continue
                cells.append(("brainsurgeon", method, s, alloc))
    for peer in args.peers:
        method = peer.split("-", 1)[1]
        for s in args.sparsities:
            cells.append((peer, method, s, "uniform"))
    wanted = set(args.methods) | {p.split("-", 1)[1] for p in args.peers}
    seen, out = set(), []
    for c in cells:
        impl, method, s, alloc = c
        keep = impl == "dense" or (
            s in args.sparsities and (
                (impl == "brainsurgeon" and method in args.methods and alloc in args.allocations)
                or (impl != "brainsurgeon" and impl in args.peers and method in wanted)))
        if keep and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--sparsities", nargs="*", default=SPARSITIES, help="fractions (0.5) or N:M (2:4)")
    ap.add_argument("--allocations", nargs="*", default=ALLOCATIONS)
    ap.add_argument("--peers", nargs="*", default=PEERS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every cell, the same for peers (1: on shared cores more threads spin-wait)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per cell")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (each in its own process)")
    ap.add_argument("--num-samples", type=int, default=NUM_SAMPLES,
                    help="calibration windows; anything but 128 (with --eval-windows 40) is a reduced protocol, stored and recorded apart")
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help="evaluation windows of 512 tokens")
    ap.add_argument("--rerun", action="store_true", help="run the selected cells even if stored")
    ap.add_argument("--retry-errors", action="store_true", help="rerun stored cells that failed")
    ap.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--record-only", action="store_true", help="rewrite the BENCHMARKS.md section from the stored cells")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        return child(json.loads(args.cell), args.tokens, args.threads)
    set_protocol(args.num_samples, args.eval_windows)
    import torch

    torch.set_num_threads(args.threads)  # the parent only tokenises; this is what the section's header reports
    if args.record_only:
        return record(load_store())
    for p in (MODEL / "config.json", AUSTEN / f"{HELD_OUT}.txt"):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run `make prepare-llm` first")
    tokens = tokens_file()
    store = load_store()
    todo = []
    for impl, method, s, alloc in plan(args):
        key = cell_key(impl, method, s, alloc)
        old = store["cells"].get(key)
        if old and not args.rerun and not (args.retry_errors and "error" in old):
            continue
        cell = {"impl": impl, "method": method, "sparsity": s, "allocation": alloc, "threads": args.threads,
                "jobs": args.jobs, "num_samples": NUM_SAMPLES, "eval_windows": EVAL_WINDOWS}
        if (impl, method, s, alloc) == ("brainsurgeon", "sparsegpt", "0.5", "uniform"):
            cell["roundtrip"] = True
        todo.append((key, cell))
    # --jobs N: N cells at once, in plan order (a pair ours/reference then runs side by side, under the
    # same load); each result records how many cells shared the machine with it
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for key, cell in todo:
            log(f"cell {key} queued")
            futures[pool.submit(run_cell, cell, tokens, args.threads, args.timeout)] = (key, cell)
        for fut in as_completed(futures):
            key, cell = futures[fut]
            out = fut.result()
            out.update(cell, finished=time.strftime("%Y-%m-%d %H:%M"), load=os.getloadavg()[0])
            store = load_store()  # another process may have stored cells meanwhile
            store["cells"][key] = out
            save_store(store)
            log(f"cell {key}: " + (out["error"] if "error" in out else
                                   f"ppl {out['perplexity']:.3f}, prune {out.get('prune_s', 0):.0f} s, "
                                   f"call peak {out.get('call_peak_mb', 0):.0f} MB"))
            if not args.no_record:
                record(store)
    if not args.no_record:
        record(store)


# ----------------------------------------------------------------------------- the section
def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _label(c: dict) -> str:
    return "dense" if c["impl"] == "dense" else f"{c['impl']} {c['method']}"


def table(store: dict) -> str:
    from _record import markdown_table

    cells = store["cells"]
    dense = cells.get("dense", {}).get("perplexity")
    order = {s: i for i, s in enumerate(SPARSITIES)}
    rows = []
    for key, c in sorted(cells.items(), key=lambda kv: (kv[0] != "dense", order.get(kv[1].get("sparsity"), 99),
                                                         kv[1].get("impl") != "brainsurgeon", kv[0])):
        if "error" in c:
            rows.append([_label(c), c.get("sparsity", "-"), c.get("allocation", "-"), "failed: " + c["error"][:200], "", "", "", "", "", ""])
            continue
        ppl = c["perplexity"]
        rows.append([
            _label(c), "-" if c["impl"] == "dense" else c["sparsity"], c.get("allocation", "-"), f"{ppl:.3f}",
            "-" if dense is None or c["impl"] == "dense" else f"{ppl - dense:+.3f}", _fmt(c.get("zeros"), ".4f"),
            _fmt(c.get("prune_s"), ".0f"),
            "-" if "call_peak_mb" not in c else f"{c['call_peak_mb']:.0f} (+{c['call_increase_mb']:.0f})",
            _fmt(c.get("llmc_process_peak_mb", c.get("process_peak_mb")), ".0f"),
            f"{c.get('threads', '-')} / {_fmt(c.get('load'), '.1f')}",
        ])
    return markdown_table(["cell", "sparsity", "allocation", "perplexity", "vs dense", "zeros in block linears",
                           "prune s", "call peak RSS MB (+ over before)", "process peak RSS MB",
                           "threads / load after"], rows)


def _best(cells: dict, sparsity: str, impls) -> dict | None:
    ok = [c for c in cells.values() if "error" not in c and c.get("sparsity") == sparsity and c["impl"] in impls]
    return min(ok, key=lambda c: c["perplexity"]) if ok else None


def _name(c: dict) -> str:
    return f"{c['impl']} {c['method']} {c['sparsity']} {c['allocation']}"


#: (ours, the reference's) speed pairs: float32 against float32; bfloat16 forwards against float32 and
#: against the reference run on the model in bfloat16 (the like-for-like pair)
SPEED_PAIRS = [("sparsegpt", "ref-sparsegpt"), ("sparsegpt+bf16", "ref-sparsegpt"),
               ("sparsegpt+bf16", "ref-sparsegpt+bf16")]


def speed_lines(cells: dict) -> list[str]:
    lines = []
    for s in ("0.5", "2:4", "0.7"):
        for method, peer in SPEED_PAIRS:
            ours = cells.get(cell_key("brainsurgeon", method, s, "uniform"))
            ref = cells.get(cell_key(peer, peer.split("-", 1)[1], s, "uniform"))
            if not (ours and ref and "error" not in ours and "error" not in ref):
                continue
            if ours.get("threads") != ref.get("threads"):
                lines.append(f"- Speed at {s}: brainsurgeon {method} ran at {ours.get('threads')} thread(s), {peer} "
                             f"at {ref.get('threads')}: not compared.")
                continue
            r = ours["prune_s"] / ref["prune_s"]
            lines.append(f"- Speed at {s}: brainsurgeon {method} {ours['prune_s']:.0f} s vs {peer} (reference driver) "
                         f"{ref['prune_s']:.0f} s: ratio {r:.2f} (target <= 0.5): **{'met' if r <= 0.5 else 'missed'}**.")
    return lines


def targets(store: dict) -> list[str]:
    cells = store["cells"]
    dense = cells.get("dense", {}).get("perplexity")
    peers = {"ref-sparsegpt", "ref-sparsegpt+bf16", "llmc-sparsegpt", "llmc-wanda"}
    lines = []
    for s in ("0.5", "2:4"):
        ours, theirs = _best(cells, s, {"brainsurgeon"}), _best(cells, s, peers)
        if ours and theirs:
            met = ours["perplexity"] <= theirs["perplexity"]
            lines.append(f"- Quality at {s}: best brainsurgeon {ours['perplexity']:.3f} ({_name(ours)}) vs best peer "
                         f"{theirs['perplexity']:.3f} ({_name(theirs)}): **{'met' if met else 'missed'}**.")
        else:
            lines.append(f"- Quality at {s}: not measured (cells missing).")
    ours, ref = _best(cells, "0.7", {"brainsurgeon"}), cells.get(cell_key("ref-sparsegpt", "sparsegpt", "0.7", "uniform"))
    if ours and ref and "error" not in ref and dense:
        a, b = ours["perplexity"] - dense, ref["perplexity"] - dense
        lines.append(f"- Quality at 0.7: increase over dense {a:.3f} ({_name(ours)}) vs reference SparseGPT {b:.3f}; "
                     f"ratio {a / b:.2f} (target <= 0.6): **{'met' if a <= 0.6 * b else 'missed'}**.")
    else:
        lines.append("- Quality at 0.7: not measured (cells missing).")
    lines += speed_lines(cells)
    for key, c in cells.items():
        if c.get("impl") == "brainsurgeon" and c.get("method") in ("sparsegpt", "sparsegpt+bf16") and "error" not in c \
                and c.get("allocation") == "uniform":
            limit = c["model_mb"] + 1024
            # before load_model() read every weight, part of the mapped model became resident inside the call
            stale = c["rss_before_mb"] < c["model_mb"]
            lines.append(f"- Memory ({_name(c)}, {c.get('threads')} thread(s)): the pruning call raised the RSS by "
                         f"{c['call_increase_mb']:.0f} MB (peak {c['call_peak_mb']:.0f} MB, {c['rss_before_mb']:.0f} MB "
                         f"before it with the {c['model_mb']:.0f} MB model loaded) against model + 1 GB = {limit:.0f} MB: "
                         + ("not judged: measured before the benchmark read the weights first, so the increase counts "
                            "about 450 MB of the user's own model paged in." if stale else
                            f"**{'met' if c['call_increase_mb'] <= limit else 'missed'}**."))
        if "roundtrip_identical" in c:
            lines.append(f"- Round trip ({_name(c)}): save_pretrained + plain from_pretrained gives "
                         f"{'identical' if c['roundtrip_identical'] else 'DIFFERENT'} logits: "
                         f"**{'met' if c['roundtrip_identical'] else 'missed'}**.")
    return lines


def render(store: dict, doc: str) -> str:
    planned = plan(argparse.Namespace(methods=METHODS, sparsities=SPARSITIES, allocations=ALLOCATIONS, peers=PEERS))
    missing = [cell_key(*c) for c in planned if cell_key(*c) not in store["cells"]]
    loads = [c.get("load") for c in store["cells"].values() if c.get("load") is not None]
    threads = sorted({c.get("threads") for c in store["cells"].values() if c.get("threads")})
    jobs = sorted({c.get("jobs", 1) for c in store["cells"].values()})
    body = [doc.split("\n\n", 1)[1].strip(), "",
            f"torch threads per cell: {threads}; cells run at once (--jobs): {jobs}; 1-minute load average after the cells: "
            f"{min(loads):.1f} to {max(loads):.1f} (a 2-core machine; 1 to 2 on it alone, 10 or more when it was shared)." if loads else "", "",
            table(store), "", "Targets:", *targets(store), ""]
    if missing:
        body.append(f"Not run ({len(missing)} cells of the default plan): " + ", ".join(missing) + ".")
    return "\n".join(body)


def record(store: dict) -> None:
    from _record import record_section

    title = "SmolLM2-135M on Jane Austen: brainsurgeon against the reference SparseGPT and llm-compressor"
    if full_protocol():
        return record_section("llm", title, "make bench-llm", render(store, __doc__))
    note = (f"**Reduced protocol** (the machine's 2 cores were shared by ~8 jobs, load average 10-15: a full-protocol "
            f"cell needs over an hour): {NUM_SAMPLES} calibration windows of {SEQ_LEN} tokens (not 128) and "
            f"{EVAL_WINDOWS} evaluation windows (not 40); everything else as in the full protocol below.\n\n")
    record_section(f"llm-{NUM_SAMPLES}x{SEQ_LEN}-w{EVAL_WINDOWS}", title + f" (reduced: {NUM_SAMPLES} x {SEQ_LEN}, {EVAL_WINDOWS} windows)",
                   f"python benchmarks/llm.py --num-samples {NUM_SAMPLES} --eval-windows {EVAL_WINDOWS}", note + render(store, __doc__))


if __name__ == "__main__":
    main()
