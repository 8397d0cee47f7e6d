"""`brainsurgeon prune --hf` / `evaluate --hf` on a tiny saved Llama with a tokenizer trained in the
test (no downloads, no material): the output reloads in plain transformers with the logits of the
Python API's result, the report's perplexities are the library's, bad input exits 2 in one line."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import brainsurgeon as bs
import brainsurgeon.cli.core  # noqa: F401  (registers the commands on the app)
from brainsurgeon import text as bstext
from test_cli import assert_bad_input, invoke  # noqa: E402
from test_text import corpus, tiny_llama, tiny_tokenizer

transformers = pytest.importorskip("transformers")

SEQ, N, WINDOWS = 16, 8, 4


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A saved tiny Llama + tokenizer, and a text long enough for N windows after the 10% holdout."""
    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(corpus(1200), encoding="utf-8")
    (root / "heldout.txt").write_text(corpus(400, seed=7), encoding="utf-8")
    return root


def prune_args(material, out, *extra):
    return ("prune", "--hf", material / "model", "--text", material / "corpus.txt", "--method", "sparsegpt",
            "--sparsity", "0.5", "--num-samples", N, "--seq-len", SEQ, "--eval-windows", WINDOWS, "--out", out, *extra)


def test_prune_hf_round_trip(material, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = digest(material / "model")
    out = tmp_path / "pruned"
    result = invoke(*prune_args(material, out))
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    assert digest(material / "model") == before  # the input directory is untouched
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    # The same calibration windows through the Python API give the same model, bit for bit.
    tok = AutoTokenizer.from_pretrained(material / "model")
    dense = AutoModelForCausalLM.from_pretrained(material / "model")
    ids = bstext.tokenize(tok, material / "corpus.txt")
    cut = int(round(ids.numel() * 0.9))
    calib = bstext.sample_windows(ids[:cut], N, SEQ, seed=0)
    res = bs.prune(dense, calib, method="sparsegpt", sparsity=0.5, num_samples=N, seed=0)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    x = ids[:SEQ][None]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, res.model.eval()(x).logits)
    for name, p in res.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name
    linears = [m for n, m in reloaded.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert zeros == pytest.approx(0.5, abs=1e-9)

    report = json.loads((out / "report.json").read_text())
    ev = report["evaluation"]
    held = ids[cut:]
    assert ev["perplexity_before"] == pytest.approx(bstext.perplexity_of_ids(dense, held, SEQ, WINDOWS)["perplexity"], rel=1e-12)
    assert ev["perplexity_after"] == pytest.approx(bstext.perplexity_of_ids(reloaded, held, SEQ, WINDOWS)["perplexity"], rel=1e-12)
    assert ev["perplexity_after"] != pytest.approx(ev["perplexity_before"], rel=1e-6)
    assert ev["windows"] == WINDOWS and report["calibration"]["num_samples"] == N

    # evaluate --hf: the library's perplexity and the sparsity of the block linears
    result = invoke("evaluate", "--hf", out, "--text", material / "heldout.txt", "--seq-len", SEQ, "--eval-windows", 3, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["perplexity"] == pytest.approx(bs.text.perplexity(reloaded, tok, material / "heldout.txt", SEQ, 3), rel=1e-12)
    assert metrics["windows"] == 3 and metrics["sparsity"] == pytest.approx(0.5, abs=1e-9)

    # --out exists: refused without --force; replaced with it (here with an evaluation text)
    assert_bad_input(invoke(*prune_args(material, out)), "exists", "--force")
    result = invoke(*prune_args(material, out, "--force", "--eval-text", material / "heldout.txt"))
    assert result.exit_code == 0, result.output
    ev2 = json.loads((out / "report.json").read_text())["evaluation"]
    assert ev2["text"] == str(material / "heldout.txt")
    assert ev2["perplexity_before"] == pytest.approx(
        bstext.perplexity_of_ids(dense, bstext.tokenize(tok, material / "heldout.txt"), SEQ, WINDOWS)["perplexity"], rel=1e-12)


def test_prune_hf_bad_input_exits_2_in_one_line(material, tmp_path):
    out = tmp_path / "out"
    model_dir, txt = material / "model", material / "corpus.txt"
    base = ("--method", "sparsegpt", "--sparsity", "0.5", "--seq-len", SEQ, "--num-samples", N)
    assert_bad_input(invoke("prune", "--hf", model_dir, *base, "--out", out), "--hf needs --text")
    assert_bad_input(invoke("prune", "--text", txt, *base, "--out", out), "give --hf DIR")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, *base, "--out", model_dir, "--force"), "is or contains the input")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, *base, "--out", material, "--force"), "is or contains the input")
    assert_bad_input(invoke("prune", "--hf", tmp_path, "--text", txt, *base, "--out", out), "no config.json")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", tmp_path / "nope.txt", *base, "--out", out), "does not exist")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, "--method", "sparsegpt", "--sparsity", "0.5",
                            "--seq-len", SEQ, "--num-samples", 500, "--out", out), "fewer than --num-samples x --seq-len", "--eval-text")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, "--method", "sparsegpt", "--sparsity", "0.5",
                            "--seq-len", 65, "--out", out), "exceeds the model's context of 64")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, *base, "--holdout", "1.5", "--out", out), "--holdout")
    assert_bad_input(invoke("prune", "--hf", model_dir, "--text", txt, "--method", "magnitude", "--sparsity", "0.25",
                            "--structure", "channel", "--out", out), "--no-compact")
    assert not out.exists()

    # a tokenizer whose ids the model cannot embed
    mismatch = tmp_path / "mismatch"
    tok = tiny_tokenizer()
    tiny_llama(len(tok) - 3).save_pretrained(mismatch)
    tok.save_pretrained(mismatch)
    assert_bad_input(invoke("prune", "--hf", mismatch, "--text", txt, *base, "--out", out), "do not belong together")
    assert_bad_input(invoke("evaluate", "--hf", mismatch, "--text", txt, "--seq-len", SEQ), "do not belong together")
    assert_bad_input(invoke("evaluate", "--hf", model_dir, "--seq-len", SEQ), "--hf needs --text")
    assert_bad_input(invoke("evaluate", "--text", txt), "give --hf DIR")


def test_prune_hf_channel_zeroed_units_round_trip(material, tmp_path):
    """--structure channel --no-compact: heads and FFN neurons zeroed in place; plain transformers reloads it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "channel"
    result = invoke("prune", "--hf", material / "model", "--text", material / "corpus.txt", "--method", "magnitude",
                    "--sparsity", "0.25", "--structure", "channel", "--no-compact", "--num-samples", N, "--seq-len", SEQ,
                    "--eval-windows", 2, "--out", out)
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "report.json").read_text())
    zero_rows = sum(int((m.weight.abs().sum(1) == 0).sum()) for n, m in reloaded.named_modules()
                    if n.endswith(("up_proj", "gate_proj")))
    assert zero_rows == 2 * report["overall"]["neurons_removed"] > 0  # each removed neuron: one gate row, one up row


def test_prune_hf_out_of_core_and_resume_flags(material, tmp_path):
    """--offload disk prunes the directory block by block into --out (the same weights as in memory)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ooc"
    result = invoke(*prune_args(material, out, "--offload", "disk"))
    assert result.exit_code == 0, result.output
    assert "block by block" in result.output
    in_memory = tmp_path / "mem"
    assert invoke(*prune_args(material, in_memory)).exit_code == 0
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(in_memory).state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "report.json").read_text())["offload"]["blocks"] > 0
    assert_bad_input(invoke(*prune_args(material, tmp_path / "x", "--resume")), "--offload disk")
    assert_bad_input(invoke(*prune_args(material, tmp_path / "y", "--offload", "disk", "--resume")), "no interrupted run")


def test_prune_hf_under_torchrun_two_ranks(material, tmp_path):
    """torchrun --nproc-per-node 2 -m brainsurgeon prune --hf ...: rank 0 writes the one-process result."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    out, single = tmp_path / "two", tmp_path / "one"
    args = [str(a) for a in prune_args(material, out, "--quiet")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "brainsurgeon", "--threads", "1", *args], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert invoke(*prune_args(material, single, "--quiet")).exit_code == 0
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single).state_dict()
    for k in b:
        assert torch.equal(a[k] == 0, b[k] == 0), k  # the same masks
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k  # float32 statistics, reduction order
