"""The Hugging Face adapter on tiny random configs: families, layouts, Conv1D swap, TokenView, token batches.

The tiny builders here are shared by tests/test_sequential.py and tests/test_hf_layerwise.py.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from brainsurgeon.adapters.hf import (  # noqa: E402
    HFAdapter,
    TokenView,
    conv1d_masks,
    conv1d_to_linear,
    is_hf_model,
    linear_to_conv1d,
    task_loss,
    token_batches,
)
from brainsurgeon.errors import BrainsurgeonError  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
VOCAB, CTX = 64, 32


def _init(model, seed):
    """Deterministic weights with some spread (the default init std 0.02 makes tiny models near-linear)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
    return model.eval()


def tiny_llama(seed=0, layers=2, hidden=32, dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=CTX,
    )
    return _init(transformers.LlamaForCausalLM(cfg), seed).to(dtype)


def tiny_gpt2(seed=0, dtype=torch.float32):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CTX,
                                  bos_token_id=0, eos_token_id=0)
    return _init(transformers.GPT2LMHeadModel(cfg), seed).to(dtype)


def tiny_opt(seed=0, dtype=torch.float32):
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=CTX, word_embed_proj_dim=32,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return _init(transformers.OPTForCausalLM(cfg), seed).to(dtype)


def tiny_bert(seed=0, dtype=torch.float32):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=CTX)
    return _init(transformers.BertModel(cfg, add_pooling_layer=False), seed).to(dtype)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


def tokens(n=6, length=12, seed=3):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_blocks_and_layout(family):
    model = BUILDERS[family]()
    assert is_hf_model(model) and not is_hf_model(nn.Linear(2, 2))
    ad = HFAdapter(model)
    assert ad.family == family
    blocks = ad.blocks(model)
    names = dict(model.named_modules())
    assert len(blocks) == 2 and all(names[n] is b for n, b in blocks)
    lay = ad.layout(blocks[0][1])
    a = lay.attention
    rel = [n for g in ad.input_groups(blocks[0][1]) for n in g]
    for n in rel + [a.o, *lay.mlp.inputs, lay.mlp.output]:
        blocks[0][1].get_submodule(n)  # every named module exists
    # every linear of the block is in exactly one input group, in module order for these families
    assert sorted(rel) == sorted(ad.linear_names(blocks[0][1]))
    assert (a.qkv is not None) == (family == "gpt2") and ((a.q is None) == (family == "gpt2"))
    hidden = model.config.hidden_size
    if family == "llama":  # GQA: k and v have num_kv_heads * head_dim rows
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 8)
        blk = blocks[0][1]
        assert blk.get_submodule(a.k).weight.shape[0] == a.num_kv_heads * a.head_dim
        assert blk.get_submodule(a.q).weight.shape[0] == a.num_heads * a.head_dim
        assert lay.mlp.inputs == ("mlp.gate_proj", "mlp.up_proj")
    else:
        assert a.num_heads == a.num_kv_heads == 4 and a.head_dim == hidden // 4
    default = ad.default_layers()
    assert len(default) == 2 * len(ad.linear_names(blocks[0][1]))
    assert not any("embed" in n or "lm_head" in n or n.startswith("wte") for n in default)


def test_llama_tied_embedding_is_one_parameter():
    model = tiny_llama()
    tied = HFAdapter(model).tied_names()
    assert [sorted(t) for t in tied] == [["lm_head", "model.embed_tokens"]]


def test_conv1d_swap_roundtrip_same_function():
    model = tiny_gpt2()
    work = copy.deepcopy(model)
    x = tokens()
    ref = model(x).logits
    swapped = conv1d_to_linear(work)
    assert len(swapped) == 8 and all(isinstance(work.get_submodule(n), nn.Linear) for n in swapped)
    lin = work.get_submodule("transformer.h.0.attn.c_attn")
    assert lin.weight.shape == (96, 32)  # (out, in): q|k|v rows
    torch.testing.assert_close(work(x).logits, ref, rtol=1e-5, atol=1e-5)
    masks = conv1d_masks({"transformer.h.0.attn.c_attn": torch.ones(96, 32, dtype=torch.bool)}, swapped)
    assert masks["transformer.h.0.attn.c_attn"].shape == (32, 96)  # the Conv1D's own (in, out)
    linear_to_conv1d(work, swapped)
    conv = work.get_submodule("transformer.h.0.attn.c_attn")
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    torch.testing.assert_close(work(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the original untouched


def test_token_view_shares_modules_and_matches_model():
    model = tiny_llama()
    view = TokenView(model)
    assert [n for n, _ in view.named_modules()] == [n for n, _ in model.named_modules()]
    assert dict(view.named_parameters()).keys() == dict(model.named_parameters()).keys()
    x = tokens()
    torch.testing.assert_close(view(x), model(x).logits)
    # the causal LM loss is the model's own (labels shifted inside)
    own = model(x, labels=x).loss
    torch.testing.assert_close(view.loss_fn(view(x), x), own)
    # a deep copy copies the model once, and the copy's view still shares with its model
    twin = copy.deepcopy(view)
    assert twin.hf is not model and twin._modules is twin.hf._modules
    with torch.no_grad():
        twin.hf.lm_head.weight.zero_()
    assert model.lm_head.weight.abs().sum() > 0


def test_token_view_attention_mask_and_padding_targets():
    model = tiny_opt()
    ids = tokens(4, 10)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    batches = token_batches({"input_ids": ids, "attention_mask": mask}, model, batch_size=3)
    assert [tuple(x.shape) for x, _ in batches] == [(3, 2, 10), (1, 2, 10)]
    x, y = batches[0]
    assert (y[0, 7:] == -100).all() and (y[1] == ids[1]).all()
    view = TokenView(model)
    ref = model(input_ids=ids[:3], attention_mask=mask[:3], labels=y).loss
    torch.testing.assert_close(view.loss_fn(view(x), y), ref)


def test_plain_encoder_targets_are_dense_hidden_states_and_loss_is_gauss_newton():
    model = tiny_bert()
    batches = token_batches(tokens(4, 8), model, batch_size=4)
    x, y = batches[0]
    view = TokenView(model)
    with torch.no_grad():
        out = view(x)
    torch.testing.assert_close(y, out)
    assert float(view.loss_fn(out, y)) == 0.0
    # the loss's Hessian in the outputs is I / B: brute force on a small slice
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    hess = torch.func.hessian(lambda o: task_loss("hidden", o, torch.zeros_like(o)))(z)
    torch.testing.assert_close(hess.reshape(30, 30), torch.eye(30, dtype=torch.float64) / 2)


def test_token_batches_iterable_of_dicts_and_num_samples():
    model = tiny_llama()
    data = [{"input_ids": tokens(3, 8, seed=s)} for s in range(3)]
    batches = token_batches(data, model, batch_size=2, num_samples=5)
    assert [x.shape[0] for x, _ in batches] == [2, 1, 2]
    assert all(torch.equal(x, y) for x, y in batches)


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.full((2, 8), VOCAB), "vocabulary has 64"),
        (torch.full((2, 8), -1), "range over"),
        (torch.zeros(2, CTX + 1, dtype=torch.long), "exceed the model's context of 32"),
        (torch.zeros(2, 8), "integer token ids"),
        ({"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}, "shape of input_ids"),
        ({"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.full((2, 8), 99)}, "labels must be -100"),
        ([{"input_ids": torch.zeros(2, 8, dtype=torch.long)}, {"input_ids": torch.full((1, 8), 70)}], "batch 1:"),
        ((torch.zeros(2, 8), torch.zeros(2)), "not token data"),
        ([], "empty"),
    ],
)
def test_token_batches_bad_input_one_line(data, message):
    with pytest.raises(BrainsurgeonError, match=message) as e:
        token_batches(data, tiny_llama())
    assert "\n" not in str(e.value)


def test_unknown_layout_refused():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=CTX)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.layers[0].mlp.gate_proj = nn.Identity()
    with pytest.raises(BrainsurgeonError, match="no list of transformer blocks"):
        HFAdapter(model)


def test_task_heads_use_the_models_own_loss():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=CTX, num_labels=3)
    ids = tokens(4, 8)
    cls = _init(transformers.BertForSequenceClassification(cfg), 1)
    labels = torch.tensor([0, 2, 1, 2])
    with pytest.raises(BrainsurgeonError, match="needs labels"):
        token_batches(ids, cls)
    (x, y), = token_batches({"input_ids": ids, "labels": labels}, cls)
    view = TokenView(cls)
    torch.testing.assert_close(view.loss_fn(view(x), y), cls(input_ids=ids, labels=labels).loss)
    mlm = _init(transformers.BertForMaskedLM(cfg), 2)
    (x, y), = token_batches(ids, mlm)
    view = TokenView(mlm)
    torch.testing.assert_close(view.loss_fn(view(x), y), mlm(input_ids=ids, labels=ids).loss)


def test_batch_encoding_of_lists_and_ragged_refused():
    model = tiny_llama()
    enc = transformers.BatchEncoding({"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1, 1, 1], [1, 1, 0]]})
    (x, y), = token_batches(enc, model)
    assert x.shape == (2, 2, 3) and y[1, 2] == -100
    with pytest.raises(BrainsurgeonError, match="rectangular"):
        token_batches(transformers.BatchEncoding({"input_ids": [[1, 2, 3], [4, 5]]}), model)


def test_truncation_is_warned_and_reported():
    import brainsurgeon as bs

    with pytest.warns(UserWarning, match="first 4 of 6 sequences") as caught:
        res = bs.prune(tiny_llama(), tokens(6, 8), "wanda", 0.5, num_samples=4)
    assert res.report["calibration_samples"] == {"used": 4, "given": 6, "truncated": True}
    assert {w.filename for w in caught} == {__file__}  # the warnings name the caller's line, not the library's
