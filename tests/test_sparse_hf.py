"""Hugging Face models: sparse directories (bs.save / bs.load / export_dense) and to_sparse per phase."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.errors import BrainsurgeonError  # noqa: E402
from brainsurgeon.sparse import SparseLinear, hf_dir  # noqa: E402
from brainsurgeon.sparse.kernels import CSR, get_engine, nm_pattern_of  # noqa: E402

VOCAB = 320


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """SmolLM2's layout (GQA 4/2 heads, tied embeddings, SiLU MLP) at a width of 128."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def prune_hf(model: nn.Module, sparsity: float | None = 0.7, nm: tuple[int, int] | None = None) -> nn.Module:
    """Magnitude-prune every block linear in place (unstructured per layer, or N:M)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                w = mod.weight
                if nm:
                    n, m = nm
                    g = w.view(w.shape[0], -1, m)
                    g.scatter_(-1, g.abs().argsort(-1)[..., : m - n], 0.0)
                else:
                    k = int(sparsity * w.numel())
                    w.view(-1)[w.abs().flatten().argsort()[:k]] = 0.0
    return model


@pytest.fixture(scope="module")
def pruned():
    return prune_hf(tiny_llama())


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- directory format
def test_sparse_directory_round_trip_is_bitwise(tmp_path, pruned):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = bs.save(pruned, tmp_path / "dir")
    files = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert "config.json" in files and hf_dir.INDEX_FILE in files
    assert [f for f in files if f.endswith(".sparse.safetensors")] == ["model-00001-of-00001.sparse.safetensors"]
    assert report["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once
    loaded = bs.load(tmp_path / "dir")
    assert type(loaded) is LlamaForCausalLM and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert same_state(loaded, pruned)
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # the input is untouched
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def test_sparse_directory_is_smaller_and_sharded(tmp_path, pruned):
    dense = hf_dir.export_dense(pruned, tmp_path / "dense")
    sparse = bs.save(pruned, tmp_path / "sparse", shard_bytes=200_000)
    assert sparse["shards"] > 1
    assert sparse["directory_bytes"] < 0.75 * dense["directory_bytes"]  # 70% of the block weights gone
    assert same_state(bs.load(tmp_path / "sparse"), pruned)


def test_export_dense_is_a_plain_hf_directory(tmp_path, pruned):
    bs.save(pruned, tmp_path / "sparse")
    hf_dir.export_dense(tmp_path / "sparse", tmp_path / "plain")
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "plain"))
    assert same_state(plain, pruned)
    fast = bs.to_sparse(pruned, engine="numba_csr")  # sparse modules are turned back into dense layers
    hf_dir.export_dense(fast, tmp_path / "plain2")
    assert same_state(LlamaForCausalLM.from_pretrained(str(tmp_path / "plain2")), pruned)


def test_tokenizer_files_are_copied_from_the_source_directory(tmp_path, pruned):
    src = tmp_path / "src"
    pruned.save_pretrained(str(src))
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text("{}")
    model = LlamaForCausalLM.from_pretrained(str(src))
    bs.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((tmp_path / "out" / hf_dir.INDEX_FILE).read_text())["tokenizer_files"] == [
        "tokenizer.json", "tokenizer_config.json"]


def test_existing_directory_is_not_overwritten(tmp_path, pruned):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("mine")
    with pytest.raises(BrainsurgeonError, match="not an empty directory"):
        bs.save(pruned, tmp_path / "dir")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["keep.txt"]


def _edit_index(d, change):
    index = json.loads((d / hf_dir.INDEX_FILE).read_text())
    change(index)
    index["checksum"] = hf_dir._index_checksum(index)
    (d / hf_dir.INDEX_FILE).write_text(json.dumps(index))


def _edit_config(d, change):
    """Edit config.json as a crafted directory would: the index's checksums updated to match."""
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    _edit_index(d, lambda index: index.__setitem__("config_sha256", hf_dir._sha256_file(d / "config.json")))


@pytest.mark.parametrize("change,match", [
    (lambda c: c.__setitem__("architectures", ["EvilForCausalLM"]), "not a transformers model class"),
    (lambda c: c.__setitem__("architectures", ["os.system"]), "not a transformers model class"),
    (lambda c: c.__setitem__("architectures", ["BertModel"]), "not a transformers model class"),
    (lambda c: c.__setitem__("model_type", "evil"), "not a transformers architecture"),
    (lambda c: c.pop("architectures"), "names no architecture"),
    (lambda c: c.__setitem__("hidden_size", 20_000), "architecture"),
])
def test_config_naming_other_code_or_shapes_is_refused(tmp_path, pruned, change, match):
    bs.save(pruned, tmp_path / "d")
    _edit_config(tmp_path / "d", change)
    with pytest.raises(BrainsurgeonError, match=match):
        bs.load(tmp_path / "d")


def test_auto_map_and_remote_code_are_never_used(tmp_path, pruned):
    bs.save(pruned, tmp_path / "d")
    marker = tmp_path / "imported"
    (tmp_path / "d" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(tmp_path / "d", lambda c: c.__setitem__("auto_map", {"AutoModelForCausalLM": "evil.EvilModel"}))
    assert same_state(bs.load(tmp_path / "d"), pruned)
    assert not marker.exists()


def test_damaged_directories_are_refused(tmp_path, pruned):
    d = tmp_path / "d"
    bs.save(pruned, d)
    shard = next(d.glob("*.sparse.safetensors"))
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100] + bytes(b ^ 1 for b in raw[-100:]))
    with pytest.raises(BrainsurgeonError, match="checksum"):
        bs.load(d)
    shard.write_bytes(raw)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg.replace('"hidden_size": 128', '"hidden_size": 256'))
    with pytest.raises(BrainsurgeonError, match="config.json does not match"):
        bs.load(d)
    (d / "config.json").write_text(cfg)
    index = (d / hf_dir.INDEX_FILE).read_text()
    (d / hf_dir.INDEX_FILE).write_text(index.replace('"aliases": {', '"aliases": {"x": "y", '))
    with pytest.raises(BrainsurgeonError, match="checksum"):
        bs.load(d)
    (d / hf_dir.INDEX_FILE).write_text(index)
    _edit_index(d, lambda i: i.__setitem__("format_version", 99))
    with pytest.raises(BrainsurgeonError, match="newer than this brainsurgeon"):
        bs.load(d)
    (d / hf_dir.INDEX_FILE).unlink()
    with pytest.raises(BrainsurgeonError, match="not a brainsurgeon sparse directory"):
        bs.load(d)


def test_declared_shapes_are_checked_before_decoding(tmp_path, pruned, monkeypatch):
    """A shard whose table declares a huge layer (with a valid checksum) is refused before decoding it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from brainsurgeon.sparse import formats, storage

    d = tmp_path / "d"
    bs.save(pruned, d)
    shard = next(d.glob("*.sparse.safetensors"))
    with safe_open(str(shard), "pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(shard))
    table = json.loads(meta[storage.TENSORS_KEY])
    name = next(k for k, v in table.items() if v["encoding"] != "dense")
    table[name]["shape"] = [20_000, 25_000]
    meta[storage.TENSORS_KEY] = json.dumps(table)
    meta[storage.CHECKSUM_KEY] = storage._checksum(arrays, meta)
    save_file(arrays, str(shard), metadata=meta)
    _edit_index(d, lambda i: i["shards"].__setitem__(shard.name, hf_dir._sha256_file(shard)))
    monkeypatch.setattr(formats, "decode", lambda e: pytest.fail("decoded a tensor of a refused shard"))
    with pytest.raises(BrainsurgeonError, match="other shapes"):
        bs.load(d)


# ----------------------------------------------------------------------------- to_sparse per phase
def test_nm_kernel_matches_dense():
    torch.manual_seed(0)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        w = torch.randn(24, 64)
        g = w.view(24, -1, m)
        g.scatter_(-1, g.abs().argsort(-1)[..., : m - n], 0.0)
        w[0, :m] = 0.0  # a group with no survivor
        csr = CSR.from_dense(w)
        assert nm_pattern_of(csr)[1] == m if n > 1 else nm_pattern_of(csr) == (1, 4)
        for engine in ("numba_nm", "numba_nm_serial"):
            e = get_engine(engine)
            state = e.prepare(csr)
            assert state.values.shape == (24, 64 // nm_pattern_of(csr)[1] * nm_pattern_of(csr)[0])
            for cols in (1, 5):
                xt = torch.randn(64, cols)
                ref = w @ xt
                assert (e.apply(state, xt) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert get_engine("numba_nm").supports(CSR.from_dense(torch.randn(8, 16))) is not None  # dense: no pattern


def test_to_sparse_chooses_per_phase_and_generates_the_same_tokens(pruned):
    fast = bs.to_sparse(pruned, prefill_tokens=32)
    report = fast.sparse_report
    q = report["model.layers.0.self_attn.q_proj"]
    assert set(q["engine"]) == {"decode", "prefill"} and set(q["times_ms"]) == {"decode", "prefill"}
    for phase in ("decode", "prefill"):
        # the winner's time is the lowest (compared as reported: rounded to 0.1 us, so two may tie)
        assert q["times_ms"][phase][q["engine"][phase]] == min(q["times_ms"][phase].values())
    assert "rows" in q["dispatch"]
    assert "measured on model.layers.0.self_attn.q_proj" in report["model.layers.1.self_attn.q_proj"]["reason"]
    assert report["lm_head"]["engine"] == "dense" and "below" in report["lm_head"]["reason"]
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (fast(ids).logits - pruned(ids).logits).abs().max() <= 1e-4
        assert torch.equal(fast.generate(ids, max_new_tokens=10, do_sample=False),
                           pruned.generate(ids, max_new_tokens=10, do_sample=False))


def test_forced_sparse_engines_decode_with_the_kv_cache(pruned):
    """Every layer sparse (no timing): greedy tokens and logits equal the dense kernels' to 1e-4."""
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref_tokens = pruned.generate(ids, max_new_tokens=12, do_sample=False)
        ref_logits = pruned(ref_tokens).logits
        for engine in ("numba_csr", "numba_csr_serial"):
            fast = bs.to_sparse(pruned, engine=engine)
            assert isinstance(fast.model.layers[1].mlp.down_proj, SparseLinear)
            assert torch.equal(fast.generate(ids, max_new_tokens=12, do_sample=False), ref_tokens)
            assert (fast(ref_tokens).logits - ref_logits).abs().max() <= 1e-4


def test_bitmask_kernels_decode_the_same_tokens_and_logits(pruned):
    """Batch 1: every decode step goes through the bitmask vector kernel; its logits, not only the prompt's."""
    ids = torch.randint(0, VOCAB, (1, 9))
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = pruned.generate(ids, **kw)
        for engine in ("bitmask", "bitmask_serial"):
            fast = bs.to_sparse(pruned, engine=engine)
            assert isinstance(fast.model.layers[0].self_attn.q_proj, SparseLinear)
            out = fast.generate(ids, **kw)
            assert torch.equal(out.sequences, ref.sequences)
            assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-4


def test_phase_dispatch_uses_the_decode_engine_for_few_rows():
    torch.manual_seed(0)
    layer = prune_hf(nn.Sequential(nn.Linear(64, 32)), 0.0)[0]
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.8)
    sparse = SparseLinear(layer, "dense", decode_engine="numba_csr")
    calls = []
    real = get_engine("numba_csr").apply
    get_engine("numba_csr").apply = lambda state, xt: calls.append(xt.shape[1]) or real(state, xt)
    try:
        for rows in (1, 8, 9, 40):
            x = torch.randn(rows, 64)
            assert (sparse(x) - layer(x)).abs().max() <= 1e-5
    finally:
        get_engine("numba_csr").apply = real
    assert calls == [1, 8]  # more than DECODE_ROWS rows ran dense


def test_nm_pruned_hf_model_uses_packed_kernel_when_forced():
    model = prune_hf(tiny_llama(1), nm=(2, 4))
    fast = bs.to_sparse(model, engine="numba_nm")
    assert fast.sparse_report["model.layers.0.mlp.up_proj"]["engine"] == "numba_nm"
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-4
    report = bs.to_sparse(model, prefill_tokens=16).sparse_report["model.layers.0.mlp.up_proj"]
    assert "numba_nm_serial" in report["times_ms"]["decode"]  # measured against dense and CSR


def test_kernels_follow_torch_thread_count(pruned):
    import numba

    fast = bs.to_sparse(pruned, engine="numba_csr")
    x = torch.randint(0, VOCAB, (1, 5))
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            with torch.no_grad():
                fast(x)
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
            assert torch.get_num_threads() == threads  # numba's OpenMP start-up does not change torch's
    finally:
        torch.set_num_threads(before)


def test_saving_a_to_sparse_hf_model_stores_its_dense_weights(tmp_path, pruned):
    fast = bs.to_sparse(pruned, engine="numba_csr")
    bs.save(fast, tmp_path / "d")
    assert same_state(bs.load(tmp_path / "d"), pruned)


def test_cuda_engine_reports_why_it_is_unusable_here():
    why = get_engine("cuda_2to4").available()
    assert (why is None) == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))
    w = torch.randn(64, 64)
    w.view(64, 16, 4)[..., 2:] = 0
    assert get_engine("cuda_2to4").supports(CSR.from_dense(w)) is None
    assert "2:4" in get_engine("cuda_2to4").supports(CSR.from_dense(torch.randn(64, 64)))


# ----------------------------------------------------------------------------- CLI and ONNX
def test_cli_export_of_hf_directories(tmp_path, pruned):
    from typer.testing import CliRunner

    import brainsurgeon.cli.export  # noqa: F401  (registers the command)
    from brainsurgeon.cli import app

    pruned.save_pretrained(str(tmp_path / "plain"))
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "sparse")])
    assert r.exit_code == 0, r.output
    assert "sparse Hugging Face directory" in r.output
    assert same_state(bs.load(tmp_path / "sparse"), pruned)
    again = runner.invoke(app, ["export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "sparse")])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "sparse"), "--force"])
    assert forced.exit_code == 0, forced.output
    d = runner.invoke(app, ["export", "--model", str(tmp_path / "sparse"), "--format", "dense", "--out", str(tmp_path / "d")])
    assert d.exit_code == 0, d.output
    assert same_state(LlamaForCausalLM.from_pretrained(str(tmp_path / "d")), pruned)
    o = runner.invoke(app, ["export", "--model", str(tmp_path / "sparse"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert o.exit_code == 0, o.output
    assert "onnxruntime matches PyTorch" in o.output
    inside = runner.invoke(app, ["export", "--model", str(tmp_path / "sparse"), "--out", str(tmp_path / "sparse" / "x")])
    assert inside.exit_code == 2 and "outside --model" in inside.output


def test_onnx_greedy_decoding_matches_pytorch(tmp_path, pruned):
    from brainsurgeon.sparse.onnx import OrtCausalLM, export_hf_onnx

    report = export_hf_onnx(bs.to_sparse(pruned, engine="numba_csr"), tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= 1e-4
    ids = torch.randint(0, VOCAB, (1, 9))
    tokens, times = OrtCausalLM(tmp_path / "m.onnx", pruned.config, threads=1).greedy(ids, 12)
    with torch.no_grad():
        assert torch.equal(tokens, pruned.generate(ids, max_new_tokens=12, do_sample=False))
    assert len(times) == 11
    with pytest.raises(BrainsurgeonError, match="causal language model"):
        export_hf_onnx(transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                                       num_attention_heads=2, intermediate_size=64)),
                       tmp_path / "b.onnx")


def test_onnx_export_of_a_model_with_pruned_heads(tmp_path):
    """Heads removed per layer (structure="channel"): each layer's cache has its own kv-head count, which the
    graph's past inputs and OrtCausalLM's empty cache follow (the config's one count fit none of them)."""
    from brainsurgeon.sparse.onnx import OrtCausalLM, export_hf_onnx

    model = tiny_llama(seed=1, layers=3)
    calib = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))
    res = bs.prune(model, calib, "magnitude", 0.5, structure="channel", allocation="global")
    kv = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in res.model.model.layers]
    assert len(set(kv + [model.config.num_key_value_heads])) > 1, kv  # the layers really differ from the config
    report = export_hf_onnx(res.model, tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= 1e-4
    ort_lm = OrtCausalLM(tmp_path / "m.onnx", res.model.config, threads=1)
    assert [past.shape[1] for past in ort_lm.empty_past()[::2]] == kv
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    tokens_ort, _ = ort_lm.greedy(ids, 10)
    with torch.no_grad():
        assert torch.equal(tokens_ort, res.model.generate(ids, max_new_tokens=10, do_sample=False))


def test_gpt2_conv1d_layers_become_sparse_and_save_in_their_own_layout(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    conv1d = type(model.transformer.h[0].mlp.c_fc)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, conv1d):
                w = mod.weight
                w.view(-1)[w.abs().flatten().argsort()[: int(0.7 * w.numel())]] = 0.0
    ids = torch.randint(0, VOCAB, (1, 8))
    for fast in (bs.to_sparse(model, engine="numba_csr"), bs.to_sparse(model, prefill_tokens=16)):
        assert fast.sparse_report["transformer.h.0.mlp.c_fc"]["kind"] == "conv1d"
        with torch.no_grad():
            assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-4
    fast = bs.to_sparse(model, engine="numba_csr")
    assert isinstance(fast.transformer.h[0].mlp.c_fc, SparseLinear)
    bs.save(fast, tmp_path / "d")
    assert same_state(bs.load(tmp_path / "d"), model)
    hf_dir.export_dense(fast, tmp_path / "plain")
    assert same_state(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "plain")), model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_compacted_heads_and_ffn_round_trip_with_identical_outputs(tmp_path, family):
    """Per-layer head counts and FFN widths (structure="channel") travel in the index: bs.load rebuilds them."""
    from test_hf_adapter import BUILDERS, tokens

    model = BUILDERS[family]()
    res = bs.prune(model, tokens(n=8, length=12), "magnitude", 0.4, structure="channel", allocation="global")
    widths = {tuple(p.shape) for n, p in res.model.named_parameters() if p.dim() == 2}
    assert widths != {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}  # really smaller
    bs.save(res.model, tmp_path / "s")
    back = bs.load(tmp_path / "s")
    x = tokens(n=2, length=10, seed=9)
    with torch.no_grad():
        a, b = res.model(x), back(x)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in res.model.state_dict().items())


# ----------------------------------------------------------------------------- decode groups
def _count_group_products(fast: nn.Module) -> dict[int, int]:
    """Wrap every decode group's stacked product with a call counter."""
    counts: dict[int, int] = {}
    for m in fast.modules():
        if isinstance(m, SparseLinear) and m._group is not None and id(m._group) not in counts:
            group, counts[id(m._group)] = m._group, 0

            def counted(x, product=group._product, key=id(group)):
                counts[key] += 1
                return product(x)

            group._product = counted
    return counts


def test_siblings_reading_one_input_share_one_decode_product(pruned):
    """q/k/v and gate/up are found by the input they share; their rows are slices of one stacked weight."""
    fast = bs.to_sparse(pruned, engine="bitmask")
    rep, attn, mlp = fast.sparse_report, "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert rep[attn + "k_proj"]["decode_group"] == [attn + p for p in ("q_proj", "k_proj", "v_proj")]
    assert rep[mlp + "up_proj"]["decode_group"] == [mlp + "gate_proj", mlp + "up_proj"]
    assert "decode_group" not in rep[attn + "o_proj"] and "decode_group" not in rep[mlp + "down_proj"]
    q, k, o = (getattr(fast.model.layers[1].self_attn, p) for p in ("q_proj", "k_proj", "o_proj"))
    assert q._group is k._group and o._group is None
    assert q._states["bitmask"].values is k._states["bitmask"].values  # one copy of the weights


def test_decode_groups_run_once_per_token_with_the_dense_tokens_and_logits(pruned):
    ids = torch.randint(0, VOCAB, (1, 9))  # 9 prompt rows: prefill engines; then 11 one-row steps
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = pruned.generate(ids, **kw)
        fast = bs.to_sparse(pruned, engine="bitmask")
        counts = _count_group_products(fast)
        out = fast.generate(ids, **kw)
    assert len(counts) == 4 and set(counts.values()) == {11}  # 2 blocks x (qkv, gate/up), once per step
    assert torch.equal(out.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-4


def _pair(bias: bool = True):
    from brainsurgeon.sparse.modules import DecodeGroup

    torch.manual_seed(3)
    dense = [nn.Linear(40, n, bias=bias) for n in (24, 8)]  # 40 columns: a partial last chunk
    for d in dense:
        with torch.no_grad():
            d.weight[torch.rand_like(d.weight) < 0.6] = 0.0
    sparse = [SparseLinear(d, "bitmask", decode_engine="bitmask") for d in dense]
    group = DecodeGroup(sparse)
    return dense, sparse, group


def test_decode_group_memo_is_per_input_version_and_handed_out_once():
    (da, db), (a, b), group = _pair()
    counts = _count_group_products(a)
    close = lambda y, ref: torch.allclose(y, ref, rtol=1e-5, atol=1e-5)  # noqa: E731
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert close(a(x), da(x)) and close(b(x), db(x))
        assert list(counts.values()) == [1]  # b took its rows from a's call
        y1 = a(x)
        y1.add_(100.0)  # the caller owns its output: a second call is computed afresh
        assert close(a(x), da(x)) and list(counts.values()) == [3]
        ya = a(x)
        x.mul_(2.0)  # in place, between the members' calls: b sees the new values
        assert close(b(x), db(x)) and not close(ya, da(x))
        x1, x2 = torch.randn(1, 40), torch.randn(1, 40)
        assert close(a(x1), da(x1)) and close(b(x2), db(x2))
    with torch.inference_mode():  # no version counter: each member computes its own rows
        xi = torch.randn(1, 40)
        before = list(counts.values())
        assert close(a(xi), da(xi)) and close(b(xi), db(xi)) and list(counts.values()) == before


def test_decode_group_survives_deepcopy_and_refuses_mismatched_members():
    import copy

    from brainsurgeon.sparse.modules import DecodeGroup

    (da, db), (a, b), group = _pair(bias=False)
    pair = copy.deepcopy(nn.ModuleList([a, b]))
    del a, b, group  # the copy owns its stacked weights
    assert pair[0]._group is pair[1]._group
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert torch.allclose(pair[0](x), da(x), atol=1e-5) and torch.allclose(pair[1](x), db(x), atol=1e-5)
    wide = SparseLinear(nn.Linear(48, 8), "bitmask")
    with pytest.raises(ValueError, match="same width"):
        DecodeGroup([SparseLinear(da, "bitmask"), wide])
    with pytest.raises(ValueError, match="stackable"):
        DecodeGroup([SparseLinear(da, "numba_csr_serial"), SparseLinear(db, "numba_csr_serial")])


def test_a_model_whose_dummy_inputs_fail_is_left_ungrouped_and_says_so(pruned, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "dummy_inputs", property(lambda self: {"input_ids": torch.tensor([[VOCAB + 5]])}))
    fast = bs.to_sparse(pruned, engine="bitmask")
    entry = fast.sparse_report["model.layers.0.self_attn.q_proj"]
    assert entry["decode_group"].startswith("not grouped: the model's dummy_inputs did not run")
    assert fast.model.layers[0].self_attn.q_proj._group is None
