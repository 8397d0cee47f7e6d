"""Trust: nothing the user has is overwritten, outputs are staged and renamed with normal modes, write
failures are one line, and the CLI's feedback (threads, progress, resume, version, compare, recipes,
CLI spelling) works as documented."""
from __future__ import annotations

import errno
import importlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import brainsurgeon as bs
from brainsurgeon.cli import COMMAND_MODULES, app, default_threads
from brainsurgeon.data import load_digits
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.io import load_model, load_state, save_weights
from brainsurgeon.models import build_model, make_spec
from brainsurgeon.recipe import load_recipe, run_recipe, staging_dir, validate
from brainsurgeon.train import train_model

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bad_input(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small LeNet-300-100 (24-12 hidden) trained on digits for 2 epochs, as safetensors with its spec."""
    ds = load_digits()
    spec = make_spec("lenet300", input_shape=ds.input_shape, num_classes=10, hidden=[24, 12])
    torch.manual_seed(0)
    net = train_model(build_model(spec), ds.train, epochs=2, lr=3e-3)
    path = tmp_path_factory.mktemp("w") / "lenet.safetensors"
    save_weights(net, path, spec)
    return path


def recipe_body(out, **over) -> dict:
    body = {
        "model": {"arch": "lenet300", "kwargs": {"hidden": [24, 12]}, "train": {"epochs": 1, "lr": 0.003}},
        "data": "digits", "method": "magnitude", "sparsity": 0.6, "schedule": "iterative", "steps": 2,
        "finetune": {"epochs": 0.4, "batch_size": 64}, "num_samples": 64, "output": str(out),
    }
    body.update(over)
    return body


def write_recipe(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


PRUNE = ("--data", "digits", "--method", "magnitude", "--sparsity", "0.5", "--num-samples", "32", "--quiet")


# ----------------------------------------------------------------------------- nothing is overwritten


def test_run_refuses_a_non_empty_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    body = recipe_body("out", schedule="oneshot")
    del body["steps"], body["finetune"]
    path = write_recipe(tmp_path / "r.yaml", body)
    bad_input(invoke("run", path, "--quiet"), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    ok = invoke("run", path, "--quiet", "--force")
    assert ok.exit_code == 0, ok.output
    assert (out / "model.safetensors").exists() and (out / "mine.txt").read_text() == "mine"


def test_run_never_replaces_its_input_weights(tmp_path, weights):
    d = tmp_path / "model"
    d.mkdir()
    src = d / "model.safetensors"
    src.write_bytes(weights.read_bytes())
    before = src.read_bytes()
    body = {"model": {"weights": "model.safetensors"}, "data": "digits", "method": "magnitude", "sparsity": 0.5,
            "num_samples": 32, "output": "."}
    path = write_recipe(d / "r.yaml", body)
    bad_input(invoke("run", path, "--quiet"), "would overwrite the input")
    bad_input(invoke("run", path, "--quiet", "--force"), "would overwrite the input")
    assert src.read_bytes() == before


def test_run_output_appears_only_when_finished_and_a_kill_blocks_nothing(tmp_path):
    out = tmp_path / "cut"
    seen = []

    def kill(k, _model):
        seen.append(out.exists())
        if k == 2:
            raise KeyboardInterrupt

    rec = validate(recipe_body(out), base=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(rec, round_hook=kill)
    assert seen == [False, False] and not out.exists()  # staged beside the output, not in it
    assert (staging_dir(out) / "checkpoint" / "state.json").exists()
    report = run_recipe(rec)  # a fresh run (no --resume) is not blocked by the interrupted one
    assert report["schedule"]["resumed_from_round"] is None
    assert (out / "model.safetensors").exists() and not staging_dir(out).exists()


def test_resume_does_not_retrain_the_dense_model(tmp_path, monkeypatch):
    import brainsurgeon.train as train_mod

    calls = []
    real = train_mod.train_model
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = run_recipe(validate(recipe_body(tmp_path / "full"), base=tmp_path))
    rec = validate(recipe_body(tmp_path / "cut"), base=tmp_path)

    def kill(k, _model):
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(rec, round_hook=kill)
    assert len(calls) == 2
    resumed = run_recipe(rec, resume=True)
    assert len(calls) == 2, "the resumed run trained the dense model again"
    assert resumed["schedule"]["resumed_from_round"] == 1
    assert resumed["evaluation"]["accuracy_before"] == full["evaluation"]["accuracy_before"]
    a, b = load_state(tmp_path / "full" / "model.safetensors"), load_state(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_get_normal_modes(tmp_path, weights):
    old = os.umask(0o022)
    try:
        r = invoke("prune", "--model", weights, *PRUNE, "--out", tmp_path / "p")
        assert r.exit_code == 0, r.output
        e = invoke("export", "--model", tmp_path / "p" / "model.safetensors", "--out", tmp_path / "s.safetensors")
        assert e.exit_code == 0, e.output
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "p") == 0o755
    assert mode(tmp_path / "p" / "model.safetensors") == 0o644 and mode(tmp_path / "p" / "report.json") == 0o644
    assert mode(tmp_path / "s.safetensors") == 0o644


def test_unwritable_output_fails_before_the_work(tmp_path, weights, monkeypatch):
    import tempfile

    import brainsurgeon.engine as engine

    monkeypatch.setattr(engine, "prune", lambda *a, **k: pytest.fail("pruned before checking the output"))
    real = tempfile.mkdtemp

    def read_only(*a, **k):
        if Path(k.get("dir", "")).resolve() == tmp_path.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    bad_input(invoke("prune", "--model", weights, *PRUNE, "--out", tmp_path / "p"), "Read-only file system")
    bad_input(invoke("compare", "--model", weights, "--data", "digits", "--methods", "magnitude",
                     "--sparsities", "0.5", "--out", tmp_path / "c"), "Read-only file system")
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists()


def test_disk_full_leaves_nothing_that_blocks_the_retry(tmp_path, weights, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    bad_input(invoke("prune", "--model", weights, *PRUNE, "--out", tmp_path / "p"), "No space left on device")
    bad_input(invoke("train", "--epochs", "1", "--out", tmp_path / "t.safetensors", "--quiet"), "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    r = invoke("prune", "--model", weights, *PRUNE, "--out", tmp_path / "p")  # no --force needed
    assert r.exit_code == 0, r.output


def test_a_full_stdout_is_one_line_and_exit_2(weights):
    code = "import sys; from brainsurgeon.cli import main; sys.argv[0] = 'brainsurgeon'; main()"
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", code, "evaluate", "--model", str(weights), "--json"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "BRAINSURGEON_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "No space left on device" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- threads, version, progress


def test_threads_option_environment_and_default(monkeypatch):
    import brainsurgeon.registry as registry

    seen = []
    real = registry.methods

    def methods():  # called by the `methods` command: records the threads it runs with
        seen.append(torch.get_num_threads())
        return real()

    monkeypatch.setattr(registry, "methods", methods)
    before = torch.get_num_threads()
    assert invoke("--threads", "3", "methods").exit_code == 0
    monkeypatch.setenv("BRAINSURGEON_THREADS", "2")
    assert invoke("methods").exit_code == 0
    assert invoke("--threads", "4", "methods").exit_code == 0  # the option wins over the environment
    assert seen == [3, 2, 4]
    assert torch.get_num_threads() == before  # restored when the command ends
    monkeypatch.setenv("BRAINSURGEON_THREADS", "many")
    bad_input(invoke("methods"), "BRAINSURGEON_THREADS")
    bad_input(invoke("--threads", "0", "methods"), "--threads")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_threads() == 1  # 2 shared cores: one thread
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_threads() == 8


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"brainsurgeon {bs.__version__}"


def test_obc_reports_progress_per_row_chunk():
    from brainsurgeon.allocation import Structure
    from brainsurgeon.pruners.obc import obc_prune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    w = torch.randn(5, 6, generator=g)
    stages = []

    def track(it, description, total):
        stages.append((description, total))
        return it

    _, keep = obc_prune(w, 2 * x.T @ x / 64, 15, Structure.parse("unstructured"), chunk_rows=2, track=track)
    assert int((~keep).sum()) == 15
    assert [t for _, t in stages] == [3, 3]  # 5 rows in chunks of 2: traces, then the replay


def test_progress_without_a_terminal_is_one_line_per_stage(tmp_path, weights):
    r = invoke("prune", "--model", weights, "--data", "digits", "--method", "obc", "--sparsity", "0.5",
               "--num-samples", "32", "--out", tmp_path / "obc", "--option", "chunk_rows=8")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(ln.startswith("obc: row traces 24x64") for ln in lines), r.output
    assert len([ln for ln in lines if ln.startswith("obc: row traces")]) == 3  # one per layer, not per chunk
    path = write_recipe(tmp_path / "r.yaml", recipe_body("run"))
    r = invoke("run", path)
    assert r.exit_code == 0, r.output
    for words in ("round 1/2", "round 2/2", "fine-tuning round 1/2", "fine-tuning round 2/2"):
        assert any(ln.startswith(words) for ln in r.output.splitlines()), (words, r.output)
    quiet = invoke("run", write_recipe(tmp_path / "q.yaml", recipe_body("q")), "--quiet")
    assert quiet.exit_code == 0 and quiet.output.strip() == ""


# ----------------------------------------------------------------------------- fine-tuning, compare, recipes


def test_finetune_never_returns_worse_than_before(mlp_case):
    model, (x, y) = mlp_case
    val = (x[:16], y[:16])
    pruned = bs.prune(model, (x, y), "magnitude", 0.5).model
    # a learning rate this large makes every epoch worse than the pruned model on the validation split
    tuned = bs.finetune(pruned, (x[16:], y[16:]), val_data=val, epochs=3, lr=0.5, optimizer="sgd", batch_size=8)
    hist = tuned.finetune_history
    before = evaluate(pruned, val)["loss"]
    assert hist["initial"]["val_loss"] == pytest.approx(before, rel=1e-6)
    assert all(e["val_loss"] > before for e in hist["epochs"])
    assert evaluate(tuned, val)["loss"] == pytest.approx(before, rel=1e-6)
    assert hist["best"]["step"] == 0


def test_compare_exits_2_when_every_cell_is_refused_and_checks_epochs(tmp_path, weights):
    args = ("compare", "--model", weights, "--data", "digits", "--methods", "magnitude,obd", "--sparsities", "0.5",
            "--num-samples", "32")
    bad_input(invoke(*args, "--allocation", "best", "--out", tmp_path / "a"), "every cell was refused")
    assert not (tmp_path / "a").exists()
    bad = invoke(*args, "--finetune-epochs", "-1", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "finetune-epochs" in bad.output and not (tmp_path / "b").exists()


def test_compare_structure_channel_and_device(tmp_path, weights):
    r = invoke("compare", "--model", weights, "--data", "digits", "--methods", "l1-norm,magnitude",
               "--sparsities", "0.25", "--structure", "channel", "--device", "cpu", "--num-samples", "32",
               "--finetune-epochs", "0.2", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    cells = {(c["method"], c["variant"]): c for c in report["results"]}
    assert cells["l1-norm", "one-shot"]["achieved_sparsity"] == pytest.approx(0.25, abs=0.05)
    assert cells["l1-norm", "fine-tuned"]["accuracy"] > 0.1
    assert "whole units" in cells["magnitude", "one-shot"]["error"]  # refused, and recorded as such
    assert report["structure"] == "channel" and report["device"] == "cpu"


def test_recipe_structure_channel_and_device(tmp_path):
    body = recipe_body("ch", method="l1-norm", structure="channel", sparsity=0.25, schedule="oneshot", device="cpu",
                       finetune={"epochs": 0.3, "batch_size": 64})
    del body["steps"]
    path = write_recipe(tmp_path / "r.yaml", body)
    r = invoke("run", path, "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "ch"
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["structure"] == "channel" and report["overall"]["removed_units"] > 0
    assert report["finetune"]["history"]["epochs"]
    model = load_model(out / "model.safetensors")  # the compact spec
    assert model.net[1].weight.shape[0] < 24
    assert "Units removed" in (out / "report.md").read_text()
    with pytest.raises(BrainsurgeonError, match="structure: channel"):
        validate(dict(body, method="magnitude"), base=tmp_path)
    with pytest.raises(BrainsurgeonError, match="one round"):
        validate(dict(body, schedule="gradual", steps=2), base=tmp_path)


def test_cli_messages_use_cli_spelling(tmp_path, weights):
    r = invoke("prune", "--model", weights, "--data", "digits", "--method", "magnitude", "--structure", "channel",
               "--sparsity", "0.5", "--out", tmp_path / "x")
    bad_input(r, "--structure channel")
    assert "structure='channel'" not in r.output
    r = invoke("prune", "--model", weights, "--data", "digits", "--method", "magnitude", "--round-to", "16",
               "--sparsity", "0.5", "--out", tmp_path / "y")
    bad_input(r, "--round-to applies to --structure channel only")
    body = recipe_body("o", schedule="oneshot", steps=3)  # the recipe's errors in the recipe's spelling
    r = invoke("run", write_recipe(tmp_path / "r.yaml", body))
    bad_input(r, "schedule: oneshot prunes in one round; got steps: 3")


# ----------------------------------------------------------------------------- docs and reports


def test_readme_and_methods_doc_list_every_registered_method():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## Methods"):readme.index("## Structured pruning")]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| `")}
    from brainsurgeon.registry import supports

    assert set(rows) == set(bs.methods())
    for name, structure in rows.items():
        expected = {(True, True): "both", (True, False): "unstructured", (False, True): "channel"}[
            (supports(name, "unstructured"), supports(name, "channel"))]
        assert structure == expected, name
    doc = (root / "docs" / "methods.md").read_text()
    assert all(f"**`{name}`**" in doc for name in bs.methods()), [n for n in bs.methods() if f"**`{n}`**" not in doc]
    assert "ALGORITHMS.md" not in readme and "docs/methods.md" in readme


def test_eigendamage_reports_its_cost_and_the_cli_prints_it(tmp_path):
    ds = load_digits()
    spec = make_spec("lenet5", input_shape=ds.input_shape, num_classes=10)
    torch.manual_seed(0)
    save_weights(build_model(spec), tmp_path / "l5.safetensors", spec)
    r = invoke("prune", "--model", tmp_path / "l5.safetensors", "--data", "digits", "--method", "eigendamage",
               "--structure", "channel", "--allocation", "global", "--sparsity", "0.5", "--num-samples", "32",
               "--out", tmp_path / "ed")
    assert r.exit_code == 0, r.output
    cost = json.loads((tmp_path / "ed" / "report.json").read_text())["cost"]
    assert cost["after"]["params"] < cost["before"]["params"]
    assert set(cost["speedup"]) == {"batch_1", "batch_64"}
    assert "speedup, batch 64" in r.output


def test_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch):
    import brainsurgeon.schedules as schedules

    real = schedules.train_masked

    def interrupt_in_round_2(model, masks, ft, steps, seed, phase="fine-tuning"):
        if phase.startswith("fine-tuning round 2"):
            raise KeyboardInterrupt
        return real(model, masks, ft, steps, seed, phase)

    monkeypatch.setattr(schedules, "train_masked", interrupt_in_round_2)
    path = write_recipe(tmp_path / "r.yaml", recipe_body("out"))
    r = invoke("run", path, "--quiet")
    assert r.exit_code == 130 and "--resume" in r.output and ".out.partial" in r.output, r.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(schedules, "train_masked", real)
    resumed = invoke("run", path, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["schedule"]["resumed_from_round"] == 1
