"""``brainsurgeon prune --hf DIR --text FILE`` and ``brainsurgeon evaluate --hf DIR --text FILE``.

The commands in :mod:`brainsurgeon.cli.core` delegate here when ``--hf`` is given. ``DIR`` is a
saved transformers causal LM (``config.json``, safetensors weights, tokenizer). Loading never runs
code from the directory (``trust_remote_code`` stays off) and reads safetensors only (no pickles).

Without ``--eval-text`` the last ``--holdout`` fraction of the text's tokens (default 10%) is held
back: calibration windows come from the rest, and the perplexity before and after pruning is
measured on the held-back tokens. The output directory is written to a temporary directory next to
it and renamed into place: it holds the pruned model (config + safetensors), the tokenizer and
``report.json``, and plain transformers loads it back.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import BrainsurgeonError

DEFAULT_HOLDOUT = 0.1


# what save_pretrained of a causal LM and its tokenizer may write, and the report
OUTPUT_NAMES = [
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "report.json",
]


def check_hf_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """``--out DIR``: refused if it is or holds an input (the model directory, a text file), exists
    and is not empty (unless ``--force``), or cannot be written; checked before any work."""
    from ..outputs import check_output

    for p in inputs:
        if p.resolve() == out.resolve() or out.resolve() in p.resolve().parents:
            raise BrainsurgeonError(f"--out {out} is or contains the input {p}; write the result elsewhere")
    check_output(out, force=force, inputs=inputs, outputs=OUTPUT_NAMES)


def _check_inputs(hf_dir: Path, text_files: list[Path]) -> None:
    if not (hf_dir / "config.json").is_file():
        raise BrainsurgeonError(f"--hf {hf_dir} is not a saved transformers model (no config.json); give the directory save_pretrained wrote")
    for f in text_files:
        if not f.is_file():
            raise BrainsurgeonError(f"text file {f} does not exist; give an existing UTF-8 text file")


def load_hf(hf_dir: Path, device: str = "cpu"):
    """(model, tokenizer) of a saved causal LM, float32, in eval mode; safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BrainsurgeonError(f"--hf {hf_dir}: cannot load its tokenizer ({str(e).splitlines()[0]}); save the tokenizer with the model") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BrainsurgeonError(f"--hf {hf_dir}: cannot load a causal LM with safetensors weights ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tok


def split_text(tok, text: Path, eval_text: Path | None, holdout: float):
    """(calibration ids, evaluation ids, description of the evaluation tokens)."""
    from .. import text as bstext

    ids = bstext.tokenize(tok, text)
    if eval_text is not None:
        return ids, bstext.tokenize(tok, eval_text), f"{eval_text}"
    if not (0.0 < holdout < 1.0):
        raise BrainsurgeonError(f"--holdout must be in (0, 1) (the fraction of the text held back for evaluation), got {holdout}")
    cut = int(round(ids.numel() * (1.0 - holdout)))
    return ids[:cut], ids[cut:], f"last {holdout:.0%} of {text} ({ids.numel() - cut} of {ids.numel()} tokens)"


def _calibration(calib_ids, eval_text, holdout, num_samples, seq_len, seed):
    from .. import text as bstext

    need = num_samples * seq_len
    if calib_ids.numel() < need:
        where = "the text" if eval_text is not None else f"the first {1 - holdout:.0%} of the text (the rest is held back; --eval-text FILE uses all of it)"
        raise BrainsurgeonError(
            f"{where} has {calib_ids.numel()} tokens, fewer than --num-samples x --seq-len = {num_samples} x {seq_len}; "
            "give more text or ask for fewer/shorter samples"
        )
    return bstext.sample_windows(calib_ids, num_samples, seq_len, seed)


def _write_hf_dir(out: Path, model, tok, report: dict) -> None:
    """Save into a temporary directory beside ``out``, then rename it into place."""
    from ..io import write_json
    from ..outputs import staged_dir

    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "report.json", report)


def prune_hf(
    *, hf_dir: Path, text: Path | None, eval_text: Path | None, method: str, sparsity, out: Path,
    structure: str, allocation: str, max_layer_sparsity: float, num_samples: int, seq_len: int,
    eval_windows: int, holdout: float, damping, layers, method_options: dict, seed: int, device: str,
    force: bool, offload: str | None = None, offload_activations: bool = False, resume: bool = False,
) -> dict:
    """The ``prune --hf`` command: returns the report it wrote to ``out/report.json``.

    Under torchrun every rank calibrates on its share of the windows (``distributed.shard_rows``)
    and rank 0 alone writes. ``offload="disk"`` prunes the directory block by block into ``out``
    (the model is never loaded whole, so no perplexity is measured)."""
    from .. import text as bstext
    from ..api import prune
    from ..distributed import is_writer, shard_rows

    if offload is not None:
        return _prune_offloaded(hf_dir, text, eval_text, method, sparsity, out, structure, num_samples, seq_len,
                                holdout, damping, layers, method_options, seed, force, offload, offload_activations,
                                resume)
    if offload_activations or resume:
        raise BrainsurgeonError("--offload-activations and --resume go with --offload disk")

    if text is None:
        raise BrainsurgeonError("--hf needs --text FILE: the calibration text (UTF-8)")
    if structure == "channel" and method_options.get("compact", True):
        # per-layer widths differ after compaction: a transformers config cannot describe them
        raise BrainsurgeonError(
            "--hf with --structure channel needs --no-compact (units zeroed in place): a compacted model's "
            "layers differ in width, which save_pretrained/from_pretrained cannot round-trip"
        )
    texts = [text] + ([eval_text] if eval_text is not None else [])
    _check_inputs(hf_dir, texts)
    check_hf_out(out, force, [hf_dir, *texts, *sorted(hf_dir.iterdir())])
    if eval_windows < 1:
        raise BrainsurgeonError(f"--eval-windows must be a positive integer, got {eval_windows}")
    model, tok = load_hf(hf_dir, device)
    bstext.check_model_tokenizer(model, tok, seq_len)
    calib_ids, eval_ids, eval_desc = split_text(tok, text, eval_text, holdout)
    calib = _calibration(calib_ids, eval_text, holdout, num_samples, seq_len, seed)
    if eval_ids.numel() < seq_len:
        raise BrainsurgeonError(f"the evaluation text ({eval_desc}) has {eval_ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    calib = calib[shard_rows(len(calib))]  # this rank's windows (all of them in one process)
    t0 = time.perf_counter()
    res = prune(
        model, calib, method, sparsity, structure=structure, allocation=allocation,
        max_layer_sparsity=max_layer_sparsity, num_samples=num_samples, damping=damping, layers=layers,
        seed=seed, device=device, progress=False, **method_options,
    )
    prune_s = time.perf_counter() - t0
    before = bstext.perplexity_of_ids(model, eval_ids, seq_len, eval_windows)  # after: the engine checks its input first
    after = bstext.perplexity_of_ids(res.model, eval_ids, seq_len, eval_windows)
    report = dict(res.report)
    report["input"] = {"hf": str(hf_dir), "text": str(text), "eval_text": None if eval_text is None else str(eval_text)}
    report["calibration"] = {"num_samples": num_samples, "seq_len": seq_len, "seed": seed, "tokens_available": int(calib_ids.numel())}
    report["evaluation"] = {
        "text": eval_desc, "seq_len": seq_len, "windows": after["windows"], "tokens": after["tokens"],
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"], "prune_s": prune_s,
    }
    if is_writer():
        _write_hf_dir(out, res.model, tok, report)
    return report


def _prune_offloaded(hf_dir, text, eval_text, method, sparsity, out, structure, num_samples, seq_len, holdout,
                     damping, layers, method_options, seed, force, offload, offload_activations, resume) -> dict:
    """``prune --hf DIR --offload disk``: the directory pruned block by block (offload.py)."""
    from transformers import AutoTokenizer

    from ..api import prune
    from ..distributed import shard_rows

    if text is None:
        raise BrainsurgeonError("--hf needs --text FILE: the calibration text (UTF-8)")
    _check_inputs(hf_dir, [text] + ([eval_text] if eval_text is not None else []))
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    calib_ids, _, _ = split_text(tok, text, eval_text, holdout)
    calib = _calibration(calib_ids, eval_text, holdout, num_samples, seq_len, seed)
    res = prune(str(hf_dir), calib[shard_rows(len(calib))], method, sparsity, structure=structure, layers=layers,
                damping=damping, seed=seed, progress=False, offload=offload, out=out,
                offload_activations=offload_activations, resume=resume, force=force, **method_options)
    return res.report


def evaluate_hf(*, hf_dir: Path, text: Path | None, seq_len: int, eval_windows: int | None, device: str) -> dict:
    """The ``evaluate --hf`` command: perplexity on the text and the sparsity of the block linears."""
    from .. import text as bstext
    from ..adapters.hf import HFAdapter

    if text is None:
        raise BrainsurgeonError("--hf needs --text FILE: the text to measure the perplexity on")
    _check_inputs(hf_dir, [text])
    if eval_windows is not None and eval_windows < 1:
        raise BrainsurgeonError(f"--eval-windows must be a positive integer, got {eval_windows}")
    model, tok = load_hf(hf_dir, device)
    bstext.check_model_tokenizer(model, tok, seq_len)
    result = bstext.perplexity_of_ids(model, bstext.tokenize(tok, text), seq_len, eval_windows)
    names = HFAdapter(model).default_layers()
    weights = [model.get_submodule(n).weight for n in names]
    numel = sum(w.numel() for w in weights)
    result["sparsity"] = sum(int((w == 0).sum()) for w in weights) / numel if numel else 0.0
    result["seq_len"] = seq_len
    return result
