"""Time and peak memory of the gradient-based methods on SmolLM2-135M-sized layers (random weights).

One decoder block of a random Llama config with SmolLM2-135M's dimensions (hidden 576, 9 heads /
3 kv heads, intermediate 1536, vocab 49152), float32, its 7 linears pruned to 0.5, calibration
``--seqs`` sequences of ``--len`` random tokens. Peak memory is the process's max RSS (a fresh
process per method). Usage: python benchmarks/hf_gradient_cost.py METHOD [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers

import brainsurgeon as bs
from brainsurgeon.adapters.hf import HFAdapter, TokenView, token_batches


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("options", nargs="*", help="method options key=value (JSON values)")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=a.layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 49152, (a.seqs, a.len), generator=torch.Generator().manual_seed(1))
    view = TokenView(model)
    batches = token_batches(ids, model, batch_size=a.batch)
    opts = {k: _value(v) for k, v in (o.split("=", 1) for o in a.options)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    res = bs.prune(view, batches, a.method, 0.5, loss_fn=view.loss_fn, layers=HFAdapter(model).default_layers(),
                   num_samples=a.seqs, **opts)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({
        "method": a.method, "options": opts, "seqs": a.seqs, "len": a.len, "layers": a.layers, "wall_s": round(wall, 1),
        "timings": {k: round(v, 1) for k, v in res.report["timings"].items()},
        "peak_rss_gib": round(rss, 2), "rss_before_prune_gib": round(rss0, 2),
        "achieved": res.report["overall"]["achieved_sparsity"], "fallbacks": res.report["numerics"]["fallbacks"][:2],
    }))


if __name__ == "__main__":
    main()
