"""Files are data: a model file or recipe never runs code; sizes are checked before allocation;
dense files keep dtypes and tied weights; damaged files and checkpoints are one-line errors."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import brainsurgeon as bs
import brainsurgeon.cli.core  # noqa: F401  (registers the commands)
import brainsurgeon.cli.export  # noqa: F401
import brainsurgeon.cli.pipeline  # noqa: F401
from brainsurgeon.checkpoint import Checkpoint
from brainsurgeon.cli import app
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.io import CHECKSUM_KEY, SPEC_KEY, VERSION_KEY, load_model, load_state, read_spec, save_weights
from brainsurgeon.models import build_model, make_spec
from brainsurgeon.recipe import load_recipe, run_recipe


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for f in fragments:
        assert f in result.output, result.output


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def write_file(path, spec, tensors=None, raw_spec: str | None = None):
    """A safetensors file with ``spec`` (or ``raw_spec`` verbatim) in its metadata, as an attacker writes it."""
    meta = {SPEC_KEY: raw_spec if raw_spec is not None else json.dumps(spec)}
    save_file(tensors if tensors is not None else {"w": torch.zeros(4)}, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------- code in specs
EVIL_MODULE = "evilmod_bs_trust"


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A marker path and, on sys.path, a module that creates the marker on import and when called."""
    marker = tmp_path / "ran"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        def make(**kwargs):
            open({str(marker)!r}, "w").close()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    yield marker
    sys.modules.pop(EVIL_MODULE, None)


def evil_specs(marker) -> dict[str, dict]:
    touch = f"touch {marker}"
    return {
        "os:system": {"factory": "os:system", "kwargs": {"command": touch}},
        "subprocess:getoutput": {"factory": "subprocess:getoutput", "kwargs": {"cmd": touch}},
        "builtins:exec": {"factory": "builtins:exec", "kwargs": {"source": f"open({str(marker)!r}, 'w')"}},
        "importlib:import_module": {"factory": "importlib:import_module", "kwargs": {"name": EVIL_MODULE}},
        "sys.path module": {"factory": f"{EVIL_MODULE}:make", "kwargs": {}},
    }


@pytest.mark.parametrize("case", ["os:system", "subprocess:getoutput", "builtins:exec", "importlib:import_module",
                                  "sys.path module"])
def test_a_file_naming_code_never_runs_it(tmp_path, evil, case):
    path = write_file(tmp_path / "evil.safetensors", evil_specs(evil)[case])
    for loader in (bs.load, load_model):
        with pytest.raises(BrainsurgeonError) as e:
            loader(path)
        assert "never runs code" in one_line(e) and "--factory" in one_line(e)
    assert_one_line_error(cli("evaluate", "--model", path, "--data", "digits"), "never runs code")
    assert_one_line_error(cli("prune", "--model", path, "--data", "digits", "--method", "magnitude", "--sparsity", "0.5",
                              "--out", tmp_path / "o"), "never runs code")
    assert_one_line_error(cli("export", "--model", path, "--out", tmp_path / "e.safetensors"), "never runs code")
    assert_one_line_error(cli("compare", "--model", path, "--data", "digits", "--methods", "magnitude",
                              "--sparsities", "0.5", "--out", tmp_path / "c"), "never runs code")
    assert not evil.exists(), "code named by the file ran"
    assert EVIL_MODULE not in sys.modules, "a module named by the file was imported"


def test_module_descriptions_are_an_allow_list(tmp_path, evil):
    """A changed-module description can only name the allow-listed layer types, with their own arguments."""
    base = make_spec("lenet300", input_shape=(1, 2, 2), num_classes=3, hidden=[4, 4])
    bad = {
        "unknown type": {"type": "os.system", "command": f"touch {evil}"},
        "extra argument": {"type": "Linear", "in_features": 4, "out_features": 4, "bias": True, "device": "meta"},
        "size beyond bounds": {"type": "Linear", "in_features": 4, "out_features": 10**9, "bias": True},
        "groups that do not divide": {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [1, 1],
                                      "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 2,
                                      "bias": True, "padding_mode": "zeros"},
    }
    for what, desc in bad.items():
        with pytest.raises(BrainsurgeonError) as e:
            build_model({**base, "modules": {"net.3": desc}})
        one_line(e)
    assert not evil.exists()


def test_a_named_factory_runs_and_only_that_one(tmp_path, monkeypatch):
    """The user names the factory (Python factory=, CLI --factory); the file's kwargs are then used. The CLI
    finds a module in the current directory without PYTHONPATH."""
    (tmp_path / "mymodel_bs_trust.py").write_text(textwrap.dedent("""
        from torch import nn
        def make(hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodel_bs_trust", raising=False)
    name = "mymodel_bs_trust:make"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    save_weights(model, tmp_path / "m.safetensors", {"factory": name, "kwargs": {"hidden": 12}})
    ok = cli("evaluate", "--model", tmp_path / "m.safetensors", "--data", "digits", "--factory", name, "--json")
    assert ok.exit_code == 0, ok.output  # the file's kwargs (hidden=12) were used, from ./mymodel_bs_trust.py
    loaded = load_model(tmp_path / "m.safetensors", factory=name)
    assert torch.equal(loaded[1].weight, model[1].weight)
    with pytest.raises(BrainsurgeonError, match="cannot import 'some_other_module'"):  # the user's factory, not the file's
        load_model(tmp_path / "m.safetensors", factory="some_other_module:make")
    assert_one_line_error(cli("evaluate", "--model", tmp_path / "m.safetensors", "--data", "digits", "--factory", name,
                              "--factory-kwargs", '{"width": 3}'), "width", "hidden")
    sys.modules.pop("mymodel_bs_trust", None)


def test_spec_errors_are_one_line(tmp_path):
    not_json = write_file(tmp_path / "nj.safetensors", None, raw_spec="{not json")
    with pytest.raises(BrainsurgeonError, match="not valid JSON"):
        read_spec(not_json)
    assert_one_line_error(cli("evaluate", "--model", not_json, "--data", "digits"), "not valid JSON")
    bad_kw = write_file(tmp_path / "kw.safetensors", {"arch": "lenet300", "kwargs": {"bogus": 3}})
    with pytest.raises(BrainsurgeonError, match="bogus") as e:
        load_model(bad_kw)
    assert "hidden" in one_line(e)  # names what the architecture takes
    assert_one_line_error(cli("evaluate", "--model", bad_kw, "--data", "digits"), "bogus")
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(BrainsurgeonError) as e:
        load_model(tmp_path / "w.pt")
    assert "--factory package.module:function" in one_line(e) and "--model package" not in one_line(e)


# ----------------------------------------------------------------------------- allocation bombs
class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (elements) created on a real device while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("width", [25_000, 10_000])
def test_declared_sizes_are_checked_before_allocating(tmp_path, width):
    """A ~60 KB file whose spec declares a 2e4 x 2.5e4 (2 GB) or 2e4 x 1e4 layer: refused before allocating."""
    spec = make_spec("lenet300", input_shape=(1, 100, 200), num_classes=10, hidden=[width, 4])
    tensors = {"net.1.weight": torch.zeros(120, 120), "net.1.bias": torch.zeros(4)}
    path = write_file(tmp_path / "bomb.safetensors", spec, tensors)
    assert path.stat().st_size < 64_000
    with LargestAllocation() as seen:
        with pytest.raises(BrainsurgeonError) as e:
            load_model(path)
        assert "do not fit" in one_line(e)
        assert_one_line_error(cli("evaluate", "--model", path, "--data", "digits"), "do not fit")
        # bs.load (sparse/storage.py) checks the spec against the file's tensors the same way
        with pytest.raises(BrainsurgeonError, match="do not fit"):
            bs.load(path)
    # reading the file's own data (as bytes) is the largest allocation: nothing beyond what the file holds
    assert seen.largest <= path.stat().st_size, f"allocated a tensor of {seen.largest} elements"


def test_a_spec_alone_is_bounded(tmp_path):
    with LargestAllocation() as seen:
        with pytest.raises(BrainsurgeonError, match="more than"):
            build_model(make_spec("lenet300", input_shape=(1, 100, 200), num_classes=10, hidden=[25_000, 4]))
    assert seen.largest == 0


# ----------------------------------------------------------------------------- integrity
def test_checksum_covers_metadata_and_tensors(tmp_path):
    model = build_model(make_spec("lenet300", input_shape=(1, 2, 2), num_classes=3, hidden=[5, 4]))
    path = tmp_path / "m.safetensors"
    save_weights(model, path, make_spec("lenet300", input_shape=(1, 2, 2), num_classes=3, hidden=[5, 4]))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    arrays = load_file(str(path))
    # the same shapes from another input shape: only the checksum notices the edited spec
    other = make_spec("lenet300", input_shape=(1, 4, 1), num_classes=3, hidden=[5, 4])
    edited = dict(meta, **{SPEC_KEY: json.dumps(other)})
    save_file(arrays, str(tmp_path / "spec.safetensors"), metadata=edited)
    changed = dict(arrays, **{"net.1.weight": arrays["net.1.weight"] + 1})
    save_file(changed, str(tmp_path / "data.safetensors"), metadata=meta)
    for name in ("spec", "data"):
        with pytest.raises(BrainsurgeonError, match="checksum"):
            load_model(tmp_path / f"{name}.safetensors")
    newer = dict(meta, **{VERSION_KEY: "3"})
    save_file(arrays, str(tmp_path / "newer.safetensors"), metadata=newer)
    with pytest.raises(BrainsurgeonError, match="version"):
        load_model(tmp_path / "newer.safetensors")
    # a file written before version 2 (no version, no checksum) loads the old way
    old = {k: v for k, v in meta.items() if k not in (VERSION_KEY, CHECKSUM_KEY)}
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata=old)
    assert torch.equal(load_model(tmp_path / "old.safetensors").net[1].weight, model.net[1].weight)


def test_truncated_files_are_one_line_errors(tmp_path):
    model = build_model(make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10, hidden=[6, 5]))
    path = tmp_path / "m.safetensors"
    save_weights(model, path, make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10, hidden=[6, 5]))
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(BrainsurgeonError) as e:
            load_model(tmp_path / "cut.safetensors")
        assert "truncated" in one_line(e)
        assert_one_line_error(cli("evaluate", "--model", tmp_path / "cut.safetensors", "--data", "digits"), "truncated")


def test_truncated_data_file_is_a_one_line_error(tmp_path):
    from brainsurgeon.data import load_tensor_file

    save_file({"x": torch.randn(50, 8), "y": torch.zeros(50, dtype=torch.long)}, str(tmp_path / "d.safetensors"))
    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BrainsurgeonError) as e:
        load_tensor_file(tmp_path / "cut.safetensors")
    assert "truncated" in one_line(e)


def test_saving_to_a_directory_is_a_one_line_error(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(BrainsurgeonError, match="is a directory") as e:
        save_weights(model, tmp_path)
    one_line(e)
    with pytest.raises(BrainsurgeonError, match="is a directory"):
        bs.save(model, tmp_path, format="dense")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- dtypes and ties
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dense_files_keep_the_dtype(tmp_path, dtype):
    spec = make_spec("lenet300", input_shape=(1, 2, 3), num_classes=3, hidden=[5, 4])
    torch.manual_seed(0)
    model = build_model(spec).to(dtype)
    save_weights(model, tmp_path / "m.safetensors", spec)
    loaded = load_model(tmp_path / "m.safetensors")
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def tied_model() -> nn.Module:
    """LeNet-300 with two 6x6 layers, the second using the first's weight (``b.weight = a.weight``)."""
    torch.manual_seed(0)
    model = build_model(make_spec("lenet300", input_shape=(1, 2, 3), num_classes=3, hidden=[6, 6]))
    model.net[3].weight = model.net[1].weight
    return model


def test_tied_parameters_are_saved_once_and_come_back_tied(tmp_path):
    model = tied_model()
    spec = make_spec("lenet300", input_shape=(1, 2, 3), num_classes=3, hidden=[6, 6])
    save_weights(model, tmp_path / "m.safetensors", spec)
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(model.state_dict()) - {"net.3.weight"}
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.net[3].weight is loaded.net[1].weight
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    x = torch.randn(4, 1, 2, 3)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert torch.equal(load_state(tmp_path / "m.safetensors")["net.3.weight"], model.net[1].weight.detach())


# ----------------------------------------------------------------------------- checkpoints
def checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ckpt = Checkpoint(tmp_path / "ck", "hash")
    ckpt.save(0, 2, model, {"0": torch.ones(4, 3, dtype=torch.bool)}, [{"round": 0}])
    return model, ckpt


def test_checkpoints_are_validated(tmp_path):
    model, ckpt = checkpoint(tmp_path)
    work, masks, history, round_index = ckpt.load(model, 2)
    assert round_index == 0 and masks["0"].all() and torch.equal(work[0].weight, model[0].weight)
    weights = tmp_path / "ck" / "round_000.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BrainsurgeonError, match="truncated") as e:
        ckpt.load(model, 2)
    one_line(e)
    weights.write_bytes(data)
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(data)
    (tmp_path / "ck" / "state.json").write_text(json.dumps(dict(state, weights="../victim.safetensors")))
    with pytest.raises(BrainsurgeonError, match="round_NNN"):
        ckpt.load(model, 2)
    ckpt.clear()  # a fresh run: the damaged state goes, the file it names outside the directory stays
    assert victim.exists(), "a checkpoint named a file outside its directory, and it was deleted"
    assert not (tmp_path / "ck" / "state.json").exists()
    (tmp_path / "ck" / "state.json").write_text(json.dumps(state))
    tensors = load_file(str(weights))
    for change in ({"mask.0": torch.ones(3, 3, dtype=torch.uint8)}, {"rng": torch.zeros(7, dtype=torch.uint8)},
                   {"model.0.weight": torch.zeros(4, 4)}):
        save_file(dict(tensors, **change), str(weights))
        with pytest.raises(BrainsurgeonError, match="do not fit") as e:
            ckpt.load(model, 2)
        one_line(e)


# ----------------------------------------------------------------------------- recipes
FACTORY_RECIPE_MODULE = textwrap.dedent("""
    from torch import nn
    open({marker!r}, "w").close()
    def make(hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
""")


def test_a_recipe_factory_needs_allow_factory(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "recipemod_bs_trust.py").write_text(FACTORY_RECIPE_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "recipemod_bs_trust", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {{factory: "recipemod_bs_trust:make", kwargs: {{hidden: 6}}, train: {{epochs: 1}}}}
        data: digits
        method: magnitude
        sparsity: 0.5
        num_samples: 64
        output: {tmp_path / "out"}
    """))
    with pytest.raises(BrainsurgeonError, match="--allow-factory") as e:
        load_recipe(recipe)
    one_line(e)
    assert_one_line_error(cli("run", recipe), "--allow-factory")
    assert not marker.exists()
    report = run_recipe(load_recipe(recipe, allow_factory=True), progress=False)
    assert marker.exists() and report["overall"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    loaded = load_model(tmp_path / "out" / "model.safetensors", factory="recipemod_bs_trust:make")
    assert loaded[1].out_features == 6
    sys.modules.pop("recipemod_bs_trust", None)


@pytest.mark.parametrize("spec", [
    {"arch": ["lenet300"]},
    {"arch": "lenet300", "kwargs": [1, 2]},
    {"arch": "lenet300", "kwargs": {"hidden": "big"}},
    {"arch": "lenet300", "kwargs": {"hidden": [True, 3]}},
    {"arch": "resnet", "kwargs": {"blocks": 100_000}},
    {"arch": "lenet5", "kwargs": {"input_shape": [1, 2]}},
    {"arch": "lenet5", "kwargs": {"input_shape": [1, 1, 1]}},
    {"arch": "lenet300", "extra": 1},
    {"arch": "lenet300", "factory": "os:system"},
    {"factory": "os:system\nsecond line", "kwargs": {"command": "true"}},
    {"arch": "lenet300", "modules": [1]},
    {"arch": "lenet300", "modules": {"": {"type": "ReLU"}}},
    {"arch": "lenet300", "modules": {"net.1": {"type": "Sequential", "children": [{"type": "ReLU"}] * 65}}},
    {"arch": "lenet300", "modules": {"net.1": {"type": "BatchNorm1d", "num_features": 4, "eps": -1.0, "momentum": 0.1,
                                               "affine": True, "track_running_stats": True}}},
])
def test_malformed_specs_are_one_line_errors(spec):
    with LargestAllocation() as seen:
        with pytest.raises(BrainsurgeonError) as e:
            build_model(spec)
    one_line(e)
    assert seen.largest < 1_000_000


def test_an_architecture_that_ties_its_own_parameters(tmp_path, monkeypatch):
    """A factory whose model ties two layers: saved once, loaded tied (also from a file holding both copies)."""
    (tmp_path / "tiedmod_bs_trust.py").write_text(textwrap.dedent("""
        from torch import nn
        def make():
            m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
            m[2].weight = m[0].weight
            return m
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "tiedmod_bs_trust:make"
    torch.manual_seed(0)
    model = build_model({"factory": name}, factory=name)
    save_weights(model, tmp_path / "m.safetensors", {"factory": name})
    both = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(both, str(tmp_path / "both.safetensors"))
    for file in ("m", "both"):
        loaded = load_model(tmp_path / f"{file}.safetensors", factory=name)
        assert loaded[2].weight is loaded[0].weight and torch.equal(loaded[0].weight, model[0].weight)
    save_file(dict(both, **{"2.weight": both["2.weight"] + 1}), str(tmp_path / "differ.safetensors"))
    with pytest.raises(BrainsurgeonError, match="one parameter"):
        load_model(tmp_path / "differ.safetensors", factory=name)
    sys.modules.pop("tiedmod_bs_trust", None)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_bs_save_and_load_keep_the_dtype(tmp_path, fmt, dtype):
    spec = make_spec("lenet300", input_shape=(1, 8, 8), num_classes=10, hidden=[6, 5])
    model = build_model(spec).to(dtype)
    model.brainsurgeon_spec = spec
    bs.save(model, tmp_path / "m.safetensors", format=fmt)
    back = bs.load(tmp_path / "m.safetensors")
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert b.dtype == a.dtype and torch.equal(a, b), k


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_bs_save_stores_a_tied_parameter_once(tmp_path, fmt):
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    bs.save(tied, tmp_path / "t.safetensors", format=fmt)
    template = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    template[1].weight = template[0].weight
    back = bs.load(tmp_path / "t.safetensors", model=template)
    assert back[0].weight is back[1].weight and torch.equal(back[0].weight, tied[0].weight)
