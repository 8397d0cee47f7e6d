"""Structured transformer pruning on SmolLM2-135M-Instruct with Jane Austen's novels
(``make bench-llm-structured``).

Calibration: ``--num-samples`` windows of 512 tokens from five novels (``bs.text.calibration``);
evaluation: perplexity on the first 40 windows of 512 tokens of the held-back *Persuasion*.
Every cell prunes heads + FFN neurons of the decoder layers with ``bs.prune(...,
structure="channel")`` (global allocation) at a fraction of the prunable head/FFN parameters, and
records perplexity, FLOPs, and the measured CPU latency ratios (prefill 1 x 512, decode 1 x 64
tokens with the KV cache, dense and pruned timed interleaved; ``report["cost"]``). The peer is
Torch-Pruning's LLM pruning (``--methods tp-magnitude,tp-taylor``; see :func:`torch_pruning_peer`).

Cells are appended to ``runs/llm_structured/results.jsonl`` as they finish (so a partial run keeps
its cells); ``--record`` writes the BENCHMARKS.md section from that file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = Path(os.environ.get("BRAINSURGEON_CACHE", Path.home() / ".cache" / "brainsurgeon"))
MODEL = CACHE / "smollm2-135m-instruct"
AUSTEN = CACHE / "austen"
HELD_OUT = "persuasion"
OUT = ROOT / "runs" / "llm_structured"
RESULTS = OUT / "results.jsonl"
RETIME = OUT / "retime.jsonl"
SECTION = "llm-structured"


def use_tag(tag: str) -> None:
    """A run kept apart (``--tag 128``: the issue's 128-sequence protocol): its own result files and section."""
    global RESULTS, RETIME, SECTION
    RESULTS, RETIME, SECTION = OUT / f"results-{tag}.jsonl", OUT / f"retime-{tag}.jsonl", f"llm-structured-{tag}"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return model, tok


def texts():
    calib = [p for p in sorted(AUSTEN.glob("*.txt")) if p.stem != HELD_OUT]
    return [p.read_text() for p in calib], (AUSTEN / f"{HELD_OUT}.txt").read_text()


def eval_ids(tok, held_out: str) -> torch.Tensor:
    from brainsurgeon.text import tokenize

    return tokenize(tok, held_out)


def perplexity(model, ids, windows: int) -> float:
    from brainsurgeon.text import perplexity_of_ids

    return perplexity_of_ids(model, ids, 512, windows)["perplexity"]


def append(row: dict, path: Path | None = None) -> None:
    path = path or RESULTS  # looked up now: --tag rebinds RESULTS after this module is loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_cells(model, calib, ids, method: str, sparsities: list[float], args):
    """One row per sparsity from ``bs.prune_sweep``: the criterion's statistics are gathered once
    and each sparsity is allocated, compensated, compacted and measured on its own copy (each
    result is what ``bs.prune`` at that sparsity gives); ``prune_s`` is the shared time plus the
    cell's own, what one ``bs.prune`` call would have taken."""
    import brainsurgeon as bs

    opts = {}
    if method == "fisher-mask" and args.tune_samples:
        opts["tune_samples"] = args.tune_samples
    for res in bs.prune_sweep(model, calib, method, sparsities, structure="channel", allocation="global",
                              batch_size=args.batch_size, round_to=args.round_to, **opts):
        cost, sparsity = res.report["cost"], sparsities[res.report["sweep"]["index"]]
        yield {
            "method": method, "sparsity": sparsity, "achieved": res.report["overall"]["achieved_sparsity"],
            "ppl": perplexity(res.model, ids, args.windows), "flops_ratio": cost["flops_ratio"],
            "prefill_speedup": cost["speedup"].get("prefill"), "decode_speedup": cost["speedup"].get("decode"),
            "heads_removed": res.report["overall"]["heads_removed"], "neurons_removed": res.report["overall"]["neurons_removed"],
            "prune_s": res.report["timings"]["total_s"], "shared_s": res.report["sweep"]["shared_s"],
            "num_samples": res.report["options"]["num_samples"], "round_to": args.round_to,
            "tune_samples": opts.get("tune_samples"),
            **({"_model": res.model} if args.finetune_epochs else {}),
            **({"saved": save_model(res.model, method, sparsity, args)} if args.save_models else {}),
        }


def run_cell(model, calib, ids, method: str, sparsity: float, args) -> dict:
    return next(run_cells(model, calib, ids, method, [sparsity], args))


def save_model(model, method: str, sparsity: float, args) -> str:
    """The compacted model under ``--save-models`` (``bs.save``), for ``--retime`` on a quiet machine."""
    import shutil

    import brainsurgeon as bs

    out = Path(args.save_models) / f"{method}-{sparsity:g}-n{args.num_samples}"
    if out.exists():
        shutil.rmtree(out)  # the benchmark's own earlier output for this cell
    bs.save(model, out)
    return str(out)


def retime(args) -> None:
    """Time every saved cell's model against the dense one again, one cell at a time and with more
    rounds than the cell itself could afford (run it alone on the machine); rows go to retime.jsonl."""
    import brainsurgeon as bs
    from brainsurgeon.structured.transformer_engine import measure_cost

    torch.set_num_threads(args.threads)
    model, _ = load()
    done = {r["saved"] for r in _read(RETIME)}
    for row in read_results():
        path = row.get("saved")
        if not path or path in done or not Path(path).exists():
            continue
        pruned = bs.load(path).eval()
        cost = measure_cost(model, pruned, rounds=(15, 9), budget_s=(60.0, 150.0))
        append({"saved": path, "method": row["method"], "sparsity": row["sparsity"], "threads": args.threads,
                "flops_ratio": cost["flops_ratio"], "prefill_speedup": cost["speedup"]["prefill"],
                "decode_speedup": cost["speedup"]["decode"], "dense_prefill_ms": cost["before"]["prefill_ms"],
                "prefill_ms": cost["after"]["prefill_ms"], "dense_decode_ms": cost["before"]["decode_ms"],
                "decode_ms": cost["after"]["decode_ms"]}, RETIME)


def run_finetuned(model, calib, ids, method: str, sparsity: float, args) -> dict:
    """The cell's pruned (compacted) model, then ``bs.finetune`` on the calibration windows with the
    model's own next-token loss (Adam, cosine, 10% of the windows held out to pick the best epoch):
    how much of the perplexity gap to dense the fine-tuning closes. A one-shot cell of this run
    whose model was saved (``--save-models``) is loaded (``bs.load``) instead of pruned again."""
    import brainsurgeon as bs

    oneshot = next((r for r in read_results() if (r["method"], r["sparsity"], r.get("num_samples")) ==
                    (method, sparsity, args.num_samples) and r.get("saved") and Path(r["saved"]).exists()), None)
    if oneshot is not None:
        row = {k: v for k, v in oneshot.items() if k != "command"}
        res_model = bs.load(row["saved"])
    else:
        row = run_cell(model, calib, ids, method, sparsity, args)
        res_model = row.pop("_model")
        if not any((r["method"], r["sparsity"], r.get("num_samples")) == (method, sparsity, row["num_samples"]) for r in read_results()):
            append(dict(row))  # the one-shot cell, as without fine-tuning
    t0 = time.perf_counter()
    tuned = bs.finetune(res_model, calib, epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                        val_fraction=0.1, select="loss", progress=False)
    ft_s = time.perf_counter() - t0
    dense = next((r["ppl"] for r in read_results() if r["method"] == "dense"), None)
    ppl_ft = perplexity(tuned, ids, args.windows)
    hist = tuned.finetune_history
    row.update(method=f"{method}+ft", ppl_oneshot=row["ppl"], ppl=ppl_ft, finetune_s=ft_s,
               finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
               best_epoch=(hist["best"] or {}).get("epoch"),
               gap_closed=(row["ppl"] - ppl_ft) / (row["ppl"] - dense) if dense else None)
    return row


def torch_pruning_peer(model, calib, sparsity: float, importance: str, batch_size: int, prune_heads: bool = True):
    """Torch-Pruning's LLM pruning as its ``examples/LLMs/prune_llm.py`` does it: one ``MetaPruner``
    over the whole model with ``GroupMagnitudeImportance(p=2, group_reduction="mean")`` (or
    ``GroupTaylorImportance`` after backward passes on the calibration data), the attention heads
    declared through ``num_heads`` (q: num_attention_heads, k/v: num_key_value_heads),
    ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``,
    ``round_to=4``, lm_head ignored. The example also prunes the hidden size at the same ratio, so
    a ratio r removes about 1 - (1 - r)^2 of the decoder parameters; it is called with the r that
    removes the cell's fraction. The example's attribute updates follow the pruning.
    ``prune_heads=False``: the same without head pruning (q/k/v outputs ignored; hidden size and
    FFN channels only): the fallback where Torch-Pruning cannot group the heads."""
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model)
    m.config.use_cache = False
    ratio = 1 - (1 - sparsity) ** 0.5
    num_heads, ignored = {}, [m.lm_head]
    for layer in m.model.layers:
        a = layer.self_attn
        if prune_heads:
            num_heads[a.q_proj] = m.config.num_attention_heads
            num_heads[a.k_proj] = m.config.num_key_value_heads
            num_heads[a.v_proj] = m.config.num_key_value_heads
        else:  # q/k/v outputs left alone (their inputs still follow the hidden size)
            ignored += [a.q_proj, a.k_proj, a.v_proj]
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:  # the example's GroupNormImportance is GroupMagnitudeImportance in the installed 1.6.0
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.MetaPruner(
        m, example_inputs=calib[:1, :32], importance=imp, global_pruning=False, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=prune_heads, prune_head_dims=False,
        head_pruning_ratio=ratio if prune_heads else 0.0, round_to=4,
        # transformers 5 returns a ModelOutput: trace the logits (the example ran on an older version)
        output_transform=lambda out: out.logits if hasattr(out, "logits") else out[0],
    )
    if importance == "taylor":
        for i in range(0, len(calib), batch_size):
            x = calib[i:i + batch_size]
            m(input_ids=x, labels=x, use_cache=False).loss.backward()
    for g in pruner.step(interactive=True):
        g.prune()
    m.zero_grad(set_to_none=True)
    m.config.hidden_size = m.lm_head.in_features
    for layer in m.model.layers:  # the example's bookkeeping of the new shapes
        a = layer.self_attn
        a.num_heads = a.q_proj.out_features // a.head_dim
        a.num_key_value_heads = a.k_proj.out_features // a.head_dim
        a.num_key_value_groups = a.num_heads // a.num_key_value_heads
    return m


def run_peer(model, calib, ids, method: str, sparsity: float, args) -> dict:
    from brainsurgeon.structured.transformer_engine import measure_cost

    t0 = time.perf_counter()
    note = "heads + FFN + hidden (the example)"
    try:
        pruned = torch_pruning_peer(model, calib, sparsity, method.split("-", 1)[1], args.batch_size)
    except RuntimeError as e:  # TP 1.6.0 cannot split 3 kv heads against 9 query heads (GQA)
        note = f"head pruning failed in Torch-Pruning ({str(e)[:60]}); FFN + hidden only"
        pruned = torch_pruning_peer(model, calib, sparsity, method.split("-", 1)[1], args.batch_size, prune_heads=False)
    prune_s = time.perf_counter() - t0
    cost = measure_cost(model, pruned)
    dense_p = sum(p.numel() for p in model.parameters())
    return {
        "method": method, "sparsity": sparsity, "ppl": perplexity(pruned, ids, args.windows),
        "achieved": (dense_p - sum(p.numel() for p in pruned.parameters())) / _prunable(model),
        "flops_ratio": cost["flops_ratio"],
        "prefill_speedup": cost["speedup"].get("prefill"), "decode_speedup": cost["speedup"].get("decode"),
        "prune_s": prune_s, "num_samples": len(calib), "note": note,
    }


def _prunable(model) -> int:
    """Parameters of the decoder layers' linears (what the cells' fractions are of)."""
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="fisher-mask,flap,magnitude,tp-magnitude")
    ap.add_argument("--sparsities", default="0.2,0.3")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--tune-samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--round-to", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=float, default=0,
                    help="fine-tune every cell's pruned model this many epochs over the calibration windows (rows 'M+ft')")
    ap.add_argument("--finetune-lr", type=float, default=2e-5)
    ap.add_argument("--skip-dense", action="store_true", help="leave the dense perplexity to another process")
    ap.add_argument("--save-models", help="bs.save each cell's pruned model under this folder (for --retime)")
    ap.add_argument("--retime", action="store_true",
                    help="only time the saved models against dense again (alone on the machine), into retime.jsonl")
    ap.add_argument("--record", action="store_true", help="only write the BENCHMARKS.md section from results.jsonl")
    ap.add_argument("--tag", help="keep this run's cells in results-TAG.jsonl and its own BENCHMARKS.md section")
    args = ap.parse_args(argv)
    if args.tag:
        use_tag(args.tag)
    if args.record:
        return record(args.tag)
    if args.retime:
        return retime(args)
    torch.set_num_threads(args.threads)
    from brainsurgeon.text import calibration

    model, tok = load()
    calib_texts, held = texts()
    calib = calibration(tok, "\n\n".join(calib_texts), num_samples=args.num_samples, seq_len=512, seed=0)
    ids = eval_ids(tok, held)
    if not args.skip_dense and not any(r["method"] == "dense" for r in read_results()):
        append({"method": "dense", "sparsity": 0.0, "ppl": perplexity(model, ids, args.windows), "num_samples": None})
    command = "python benchmarks/llm_structured.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for method in args.methods.split(","):
        tag = f"{method}+ft" if args.finetune_epochs else method
        done = {(r["method"], r["sparsity"], r.get("num_samples")) for r in read_results()}  # other processes' cells
        todo = [s for s in (float(v) for v in args.sparsities.split(",")) if (tag, s, args.num_samples) not in done]
        if todo and not method.startswith("tp-") and not args.finetune_epochs:
            try:  # one sweep: the statistics once for every sparsity
                for row in run_cells(model, calib, ids, method, list(todo), args):  # todo shrinks as rows come
                    append({**row, "command": command})
                    todo.remove(row["sparsity"])
            except Exception as e:  # a failed cell is recorded, the others still run
                append({"method": tag, "sparsity": todo.pop(0), "error": f"{type(e).__name__}: {e}",
                        "num_samples": args.num_samples, "command": command})
            continue
        for s in todo:
            run = run_peer if method.startswith("tp-") else run_finetuned
            try:
                row = run(model, calib, ids, method, s, args)
            except Exception as e:  # a failed cell is recorded, the others still run
                row = {"method": tag, "sparsity": s, "error": f"{type(e).__name__}: {e}", "num_samples": args.num_samples}
            append({**row, "command": command})


def _tuned_on(rows: list[dict]) -> str:
    sizes = sorted({r.get("tune_samples", 16) or r.get("num_samples") for r in rows if r["method"].startswith("fisher-mask")})
    return "the first " + " / ".join(map(str, sizes)) if sizes else "the calibration sequences"


def _command_line() -> str:
    """The commands of this run's cells, as they were given (recorded with each cell)."""
    cmds = list(dict.fromkeys(r["command"] for r in read_results() if r.get("command")))
    return "; ".join(cmds) or "python benchmarks/llm_structured.py"


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_results() -> list[dict]:
    return _read(RESULTS)


def record(tag: str | None = None) -> None:
    from _record import markdown_table, record_section

    rows = read_results()
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    quiet = {r["saved"]: r for r in _read(RETIME)}  # the latest retiming of each saved model
    table = []
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["method"])):
        if r["method"] == "dense":
            continue
        if "error" in r:
            table.append([r["method"], r["sparsity"], "failed: " + r["error"][:80], "", "", "", "", "", "", ""])
            continue
        note = r.get("note", "")
        if "ppl_oneshot" in r:
            note = (f"fine-tuned {r['finetune_epochs']:g} epochs over the calibration windows (Adam lr {r['finetune_lr']:g}, "
                    f"{r['finetune_s']:.0f} s): one-shot {r['ppl_oneshot']:.2f}, {r['gap_closed']:.0%} of the gap to dense closed")
        pre, dec = r.get("prefill_speedup") or "", r.get("decode_speedup") or ""
        if (q := quiet.get(r.get("saved"))) is not None:
            note = (note + "; " if note else "") + (
                f"speedups retimed alone ({q['threads']} thread(s), more rounds); in the run {pre:.2f} / {dec:.2f}")
            pre, dec = q["prefill_speedup"], q["decode_speedup"]
        secs = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else ""
        if r.get("shared_s") is not None:
            secs += f" ({r['shared_s']:.0f} shared)"
        table.append([r["method"], r["sparsity"], r["ppl"], r["ppl"] / dense if dense else "", r["flops_ratio"],
                      pre, dec, r.get("num_samples"), secs, note])
    body = (f"SmolLM2-135M-Instruct, dense perplexity {dense:.3f} on 40 x 512 tokens of *Persuasion*. Heads + FFN neurons "
            "removed (fraction of the decoder head/FFN parameters), global allocation, one-shot. Calibration sequences "
            f"of 512 tokens as listed (fisher-mask tunes its masks on {_tuned_on(rows)}); tp-* is Torch-Pruning's LLM example "
            "at the ratio removing the same fraction, FFN + hidden size where it could not group the heads; speedups are "
            "dense / pruned latency, timed interleaved on the shared machine."
            + (" Prune s: the pruning call's wall time; where part is shared, the cell came from one `bs.prune_sweep` per "
               "criterion, its statistics gathered once for all the sparsities (each result equal to `bs.prune`'s at that "
               "sparsity), and the figure is the shared part plus the cell's own." if any("shared_s" in r for r in rows) else "")
            + "\n\n"
            + markdown_table(["method", "removed", "ppl", "ppl / dense", "FLOPs ratio", "prefill speedup", "decode speedup",
                              "calib seqs", "prune s", "note"], table))
    if tag:
        sizes = sorted({r.get("num_samples") for r in rows if r.get("num_samples")})
        return record_section(SECTION, f"Structured transformer pruning, run '{tag}' ({', '.join(map(str, sizes))} "
                              "calibration sequences)", f"{_command_line()}, then --record --tag {tag}", body)
    record_section("llm-structured", "Structured transformer pruning (heads + FFN neurons)",
                   "python benchmarks/llm_structured.py --num-samples 32 --tune-samples 16 --threads 1 --skip-dense --methods M "
                   "--sparsities S (two such processes at once, one core each; the fine-tuned rows with --finetune-epochs 2 "
                   "--finetune-lr 5e-5), then --record; `make bench-llm-structured` runs the full grid at 128 sequences", body)


if __name__ == "__main__":
    main()
