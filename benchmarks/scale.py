"""Scale (`make bench-scale`): out-of-core pruning of a model larger than the memory it is given, and
1 vs 2 processes with torch.distributed (gloo) on SmolLM2-135M.

Part "memory". A randomly initialised Llama-architecture model of about 6 GB in float32 (hidden
2048, 24 layers, intermediate 5504, vocabulary 32000, 16 heads) is written as safetensors shards
(one per block, tensor by tensor: writing it never holds the model) to the cache. SparseGPT 50%
prunes it:
  * out of core (`bs.prune(DIR, ..., offload="disk", out=OUT)`), in a subprocess whose address
    space is limited (`RLIMIT_AS`, `--limit-gb`, what `ulimit -v` sets) to far less than the model;
  * in memory (`bs.prune(DIR, ...)`: the model loaded, then pruned) under the same limit, which
    it cannot run in (the failure is recorded), and without the limit for its wall time when the
    machine has the memory free (skipped, and said so, when it has not).
Peak RSS is the child's VmHWM. The calibration is small (`--samples` x `--seq-len` random tokens):
the claim is about the weights; the cached activations are samples x seq_len x hidden x 4 bytes.

Part "distributed". SmolLM2-135M (`make prepare-llm`), calibration windows of the five Austen
novels, sparsegpt and wanda at 50%: one process with 2 threads against `torchrun
--nproc-per-node 2` with 1 thread each (the same 2 cores), and one process with 1 thread as the
reference of the identity checks (the same per-process threads as each rank). Statistics and solve time per rank from
the report, the wall time of the pruning call, the peak RSS of each rank (ranks own disjoint
layers of each group for the solve), and the identity of the results: masks equal and the largest
weight difference against the 1-process run. One more run puts the two ranks out of core.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

CACHE = Path(os.environ.get("BRAINSURGEON_CACHE", Path.home() / ".cache" / "brainsurgeon"))
BIG = CACHE / "scale-llama-6gb"
SMOL = CACHE / "smollm2-135m-instruct"
AUSTEN = CACHE / "austen"
WORK = CACHE / "scale-bench"
NOVELS = ("sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# ----------------------------------------------------------------------------- the 6 GB model
def write_random_llama(path: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int) -> float:
    """Shards of a random Llama, one block per file, each tensor generated and written in turn."""
    import torch
    import transformers
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def shard(fname: str, shapes: dict[str, tuple]) -> None:
        tensors = {k: (torch.randn(s, generator=g) * s[-1] ** -0.5 if len(s) == 2 else torch.ones(s)) for k, s in shapes.items()}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shapes})

    shard("model-embed.safetensors", {"model.embed_tokens.weight": (vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}"
        shard(f"model-layer-{i:03d}.safetensors", {
            f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (hidden, hidden),
            f"{p}.self_attn.v_proj.weight": (hidden, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
        })
    shard("model-head.safetensors", {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.replace(tmp, path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30


# ----------------------------------------------------------------------------- children
def child_memory(args) -> dict:
    import torch

    import brainsurgeon as bs

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if args.mode == "offload":
        res = bs.prune(str(BIG), ids, "sparsegpt", 0.5, offload="disk", out=args.out, force=True, batch_size=1,
                       offload_activations=args.activations_on_disk)
    else:
        res = bs.prune(str(BIG), ids, "sparsegpt", 0.5, batch_size=1)
    wall = time.perf_counter() - t0
    t = res.report["timings"]
    return {"wall_s": wall, "statistics_s": t.get("statistics_s"), "solve_s": t.get("solve_s"),
            "achieved": res.report["overall"]["achieved_sparsity"], "peak_rss_gb": peak_rss_gb()}


def _smol_tokens(n: int, seq_len: int):
    import brainsurgeon as bs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOL))
    return bs.text.calibration(tok, [str(AUSTEN / f"{x}.txt") for x in NOVELS], num_samples=n, seq_len=seq_len, seed=0)


def child_distributed(args) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import brainsurgeon as bs
    from brainsurgeon.distributed import init_from_env, shard_rows, world

    torch.set_num_threads(args.threads)
    init_from_env("gloo")
    rank, size = world()
    ids = _smol_tokens(args.samples, args.seq_len)
    shard = ids[shard_rows(len(ids))]
    t0 = time.perf_counter()
    if args.mode == "offload":
        res = bs.prune(str(SMOL), shard, args.method, 0.5, offload="disk", out=args.out, force=True, batch_size=4)
        state = None
    else:
        model = AutoModelForCausalLM.from_pretrained(str(SMOL))
        res = bs.prune(model, shard, args.method, 0.5, batch_size=4)
        state = {k: v.contiguous() for k, v in res.model.state_dict().items() if "layers" in k}
    wall = time.perf_counter() - t0
    if rank == 0 and state is not None:
        save_file(state, args.out)
    t = res.report["timings"]
    return {"rank": rank, "world": size, "wall_s": wall, "statistics_s": t.get("statistics_s"),
            "solve_s": t.get("solve_s"), "peak_rss_gb": peak_rss_gb()}


# ----------------------------------------------------------------------------- the parent
def run_child(argv: list[str], limit_gb: float | None = None, torchrun: int = 0, timeout: float = 7200) -> list[dict]:
    """Run this script as a child (or under torchrun); each process prints one JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", *cmd[1:]]

    def limit():
        if limit_gb:
            n = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    log(" ".join(cmd[-12:]))
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not rows:
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return [{"error": f"exit {p.returncode}: {tail[0][:200]}"}]
    return rows


def part_memory(args) -> str:
    import psutil

    size = write_random_llama(BIG, 24, 2048, 5504, 32000, 16)
    log(f"model: {size:.2f} GiB of shards in {BIG}")
    common = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    out = str(WORK / "big-out")
    rows = []
    off = run_child(["memory", "--mode", "offload", "--out", out, *common], limit_gb=args.limit_gb)[0]
    rows.append(("out of core", f"{args.limit_gb:g} GB address space", off))
    mem_limited = run_child(["memory", "--mode", "memory", *common], limit_gb=args.limit_gb)[0]
    rows.append(("in memory", f"{args.limit_gb:g} GB address space", mem_limited))
    free = psutil.virtual_memory().available / 2**30
    if free > 3 * size + 2:
        rows.append(("in memory", "none", run_child(["memory", "--mode", "memory", *common])[0]))
    else:
        rows.append(("in memory", "none", {"error": f"not run: {free:.1f} GiB free, it needs about {3 * size:.0f}"}))
    lines = [f"Model: random Llama, hidden 2048, 24 layers, intermediate 5504, vocabulary 32000: "
             f"{size:.2f} GiB of float32 safetensors shards. SparseGPT 50% uniform; calibration "
             f"{args.samples} x {args.seq_len} random tokens; {args.threads} threads.", "",
             "| path | limit | wall s | statistics s | solve s | peak RSS GiB | achieved sparsity |", "|---|---|---|---|---|---|---|"]
    for name, limit, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {limit} | failed: {r['error']} | | | | |")
        else:
            lines.append(f"| {name} | {limit} | {r['wall_s']:.0f} | {r['statistics_s']:.0f} | {r['solve_s']:.0f} | "
                         f"{r['peak_rss_gb']:.2f} | {r['achieved']:.4f} |")
    return "\n".join(lines)


def _compare(a: str, b: str) -> tuple[bool, float]:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    same_masks = all(bool(((x[k] == 0) == (y[k] == 0)).all()) for k in x if k.endswith("proj.weight"))
    diff = max(float((x[k] - y[k]).abs().max()) for k in x)
    return same_masks, diff


def part_distributed(args) -> str:
    common = ["--samples", str(args.samples_dist), "--seq-len", str(args.seq_len)]
    lines = [f"SmolLM2-135M, {args.samples_dist} x {args.seq_len} Austen calibration windows, 50% uniform, gloo. "
             "The identity columns compare each run with the 1-process run at 1 thread: float32 GEMMs round "
             "differently with another thread count (1 process at 2 threads against 1 thread: sparsegpt's masks "
             "differ, the solve amplifies rounding), so the distributed run's reference is a process with the "
             "threads each rank has.", "",
             "| method | processes x threads | wall s (rank 0) | statistics s | solve s | peak RSS GiB per rank | masks as 1 process x 1 thread | max weight diff |",
             "|---|---|---|---|---|---|---|---|"]
    for method in ("sparsegpt", "wanda"):
        ref_out = str(WORK / f"{method}-1t1.safetensors")
        one_out, two_out = str(WORK / f"{method}-1.safetensors"), str(WORK / f"{method}-2.safetensors")
        ref = run_child(["distributed", "--mode", "memory", "--method", method, "--out", ref_out, "--threads", "1", *common])
        one = run_child(["distributed", "--mode", "memory", "--method", method, "--out", one_out, "--threads", "2", *common])
        two = run_child(["distributed", "--mode", "memory", "--method", method, "--out", two_out, "--threads", "1", *common], torchrun=2)
        for label, rs, out in (("1 x 1", ref, None), ("1 x 2", one, one_out), ("2 x 1", two, two_out)):
            if any("error" in r for r in rs):
                lines.append(f"| {method} | {label} | failed: {rs[0]['error']} | | | | | |")
                continue
            r0 = min(rs, key=lambda r: r.get("rank", 0))
            same, diff = _compare(ref_out, out) if out else (True, 0.0)
            rss = " / ".join(f"{r['peak_rss_gb']:.2f}" for r in sorted(rs, key=lambda r: r.get("rank", 0)))
            lines.append(f"| {method} | {label} | {r0['wall_s']:.0f} | {r0['statistics_s']:.0f} | {r0['solve_s']:.0f} | "
                         f"{rss} | {'yes' if same else 'NO'} | {diff:.2e} |")
    off = run_child(["distributed", "--mode", "offload", "--method", "sparsegpt", "--out", str(WORK / "smol-offload"),
                     "--threads", "1", *common], torchrun=2)
    if any("error" in r for r in off):
        lines.append(f"| sparsegpt, out of core | 2 x 1 | failed: {off[0]['error']} | | | | | |")
    else:
        r0 = min(off, key=lambda r: r["rank"])
        rss = " / ".join(f"{r['peak_rss_gb']:.2f}" for r in sorted(off, key=lambda r: r["rank"]))
        lines.append(f"| sparsegpt, out of core | 2 x 1 | {r0['wall_s']:.0f} | {r0['statistics_s']:.0f} | {r0['solve_s']:.0f} | "
                     f"{rss} | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["memory", "distributed"])
    ap.add_argument("--mode", choices=["offload", "memory"], default="offload")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--out")
    ap.add_argument("--activations-on-disk", action="store_true")
    ap.add_argument("--parts", default="memory,distributed")
    ap.add_argument("--samples", type=int, default=4, help="calibration sequences for the 6 GB model")
    ap.add_argument("--samples-dist", type=int, default=32, help="calibration sequences for SmolLM2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=5.0, help="address-space limit of the limited runs")
    args = ap.parse_args()
    if args.child:
        fn = child_memory if args.child == "memory" else child_distributed
        print(json.dumps(fn(args)), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    from _record import record_section

    cmd = ("python benchmarks/scale.py " + " ".join(sys.argv[1:])).strip()
    if "memory" in args.parts:  # each part its own section: a rerun of one leaves the other
        record_section("scale", "Scale: out of core, a 5 GiB model", cmd, part_memory(args))
    if "distributed" in args.parts:
        record_section("scale-distributed", "Scale: torch.distributed, 1 vs 2 processes", cmd, part_distributed(args))


if __name__ == "__main__":
    main()
