"""Out of core: an HF directory pruned block by block equals the in-memory run; resume; refusals."""
from __future__ import annotations

import json

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon import offload
from brainsurgeon.errors import BrainsurgeonError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from test_hf_adapter import tiny_llama

    d = tmp_path_factory.mktemp("src") / "llama"
    model = tiny_llama(seed=0, layers=3, hidden=32)
    model.save_pretrained(d, max_shard_size="20KB")  # several shards and an index
    assert (d / offload.INDEX).is_file()
    return d


def _tokens():
    from test_hf_adapter import tokens

    return tokens(n=6, length=12, seed=3)


def _weights(directory):
    m = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return {k: v for k, v in m.state_dict().items()}


@pytest.mark.parametrize("method,kwargs", [("sparsegpt", {}), ("wanda", {"structure": "2:4"})])
def test_out_of_core_equals_in_memory(saved, tmp_path, method, kwargs):
    out = tmp_path / "out"
    res = offload.prune_offloaded(saved, _tokens(), method, None if kwargs else 0.5, out=out, batch_size=2, **kwargs)
    dense = transformers.AutoModelForCausalLM.from_pretrained(saved)
    ref = bs.prune(dense, _tokens(), method, None if kwargs else 0.5, batch_size=2, **kwargs)
    got = _weights(out)
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-6), k
        assert torch.equal(got[k] == 0, v == 0) or "embed" in k or "norm" in k, k
    assert res.model is None and res.report["offload"]["blocks"] == 3
    assert abs(res.report["overall"]["achieved_sparsity"] - 0.5) < 1e-9
    assert res.report["calibration"]["path"] == "block-sequential"
    assert not (tmp_path / ".out.partial").exists()
    assert (out / "config.json").is_file() and json.loads((out / "report.json").read_text())["method"] == method


def test_activations_on_disk_give_the_same_result(saved, tmp_path):
    a = offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.5, out=tmp_path / "a", batch_size=2)
    b = offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.5, out=tmp_path / "b", batch_size=2,
                                offload_activations=True)
    assert b.report["offload"]["activations_on_disk"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / ".b.partial").exists()


def test_interrupted_run_resumes_to_the_identical_result(saved, tmp_path, monkeypatch):
    full = tmp_path / "full"
    offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.6, out=full, batch_size=2)
    out = tmp_path / "out"
    original = offload.DiskHooks.after_block
    done = []

    def crash_after_two(self, name, block):
        original(self, name, block)
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second block was written

    monkeypatch.setattr(offload.DiskHooks, "after_block", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.6, out=out, batch_size=2)
    monkeypatch.setattr(offload.DiskHooks, "after_block", original)
    assert not out.exists() and (tmp_path / ".out.partial" / "state.json").is_file()
    with pytest.raises(BrainsurgeonError, match="resume=True"):
        offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.6, out=out, batch_size=2)
    with pytest.raises(BrainsurgeonError, match="another model, method"):
        offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.5, out=out, batch_size=2, resume=True)
    res = offload.prune_offloaded(saved, _tokens(), "sparsegpt", 0.6, out=out, batch_size=2, resume=True)
    assert res.report["offload"]["blocks_resumed"] == 2
    wf, wr = _weights(full), _weights(out)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_refusals_before_any_work(saved, tmp_path):
    data = _tokens()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        (dict(out=tmp_path / "full"), "exists and is not empty"),
        (dict(out=saved / "inside"), "model directory being pruned"),
        (dict(out=tmp_path / "o", allocation="global"), "out of core runs allocation='uniform'"),
        (dict(out=tmp_path / "o", resume=True), "no interrupted run"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(BrainsurgeonError, match=msg):
            offload.prune_offloaded(saved, data, "sparsegpt", 0.5, **kwargs)
    with pytest.raises(BrainsurgeonError, match="layer-wise methods"):
        offload.prune_offloaded(saved, data, "obd", 0.5, out=tmp_path / "o")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_a_single_file_directory(tmp_path):
    from test_hf_adapter import tiny_llama

    tiny_llama(seed=1, layers=2).save_pretrained(tmp_path / "one")
    assert not (tmp_path / "one" / offload.INDEX).exists()
    res = offload.prune_offloaded(tmp_path / "one", _tokens(), "wanda", 0.5, out=tmp_path / "o", batch_size=2)
    assert res.report["overall"]["achieved_sparsity"] == 0.5


def test_directory_is_data_shapes_checked_before_loading(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 20000  # the config now claims much larger layers than the shards hold
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BrainsurgeonError, match="is stored with shape"):
        offload.load_skeleton(bad)
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BrainsurgeonError, match="custom code"):
        offload.load_skeleton(bad)


def test_bs_prune_takes_a_directory(saved, tmp_path):
    res = bs.prune(str(saved), _tokens(), "wanda", 0.5, offload="disk", out=tmp_path / "o", batch_size=2)
    assert res.model is None and (tmp_path / "o" / offload.INDEX).is_file()
    loaded = bs.prune(saved, _tokens(), "wanda", 0.5, batch_size=2)  # no offload: loaded, pruned in memory
    got = _weights(tmp_path / "o")
    assert all(torch.equal(got[k], v) for k, v in loaded.model.state_dict().items())
    with pytest.raises(BrainsurgeonError, match="give out="):
        bs.prune(saved, _tokens(), "wanda", 0.5, offload="disk")
    with pytest.raises(BrainsurgeonError, match="does not apply with offload"):
        bs.prune(saved, _tokens(), "wanda", 0.5, offload="disk", out=tmp_path / "p", schedule="gradual")
