"""bs.finetune on Hugging Face models: token data, the model's own loss, masks held (Linear and
GPT-2's Conv1D), tied embeddings kept tied, compacted (structured) models, the user's model untouched."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import brainsurgeon as bs  # noqa: E402
from brainsurgeon.errors import BrainsurgeonError  # noqa: E402

from test_hf_adapter import VOCAB, tiny_gpt2, tiny_llama, tokens  # noqa: E402


def learnable(n=16, length=16, seed=5):
    """Counting sequences from random starts: next-token structure a few steps can learn."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)) % VOCAB


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lm_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def _zeros(model, names):
    return {n: model.get_submodule(n).weight.detach() == 0 for n in names}


def test_llama_unstructured_masks_held_loss_falls_user_model_untouched():
    model = tiny_llama(seed=1)
    ids = learnable(n=16, length=16, seed=5)
    res = bs.prune(model, ids, "magnitude", 0.5)
    pruned = res.model
    before = _state(pruned)
    layers = [n for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    zeros = _zeros(pruned, layers)
    tuned = bs.finetune(pruned, ids, epochs=10, lr=1e-2, batch_size=4, val_fraction=0, select="last")
    # the user's (pruned) model is untouched; the copy trained
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())
    assert _lm_loss(tuned, ids) < 0.9 * _lm_loss(pruned, ids)
    for n in layers:
        w = tuned.get_submodule(n).weight
        assert torch.equal(w == 0, zeros[n]), n  # exactly the pruned entries are zero
        assert not torch.equal(w, pruned.get_submodule(n).weight), n  # the kept ones moved
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight  # still one parameter
    assert not hasattr(tuned.model.layers[0].self_attn.q_proj, "parametrizations")  # squashed
    assert tuned.finetune_history["options"]["train_samples"] == 16


def test_validation_loss_is_the_models_own_loss():
    model = tiny_llama(seed=2)
    ids, val = tokens(n=8, length=16, seed=6), tokens(n=4, length=16, seed=7)
    tuned = bs.finetune(model, ids, val_data=val, epochs=1, lr=1e-3, batch_size=4)
    initial = tuned.finetune_history["initial"]["val_loss"]
    assert initial == pytest.approx(_lm_loss(model, val), rel=1e-5)
    # the best state by validation loss is returned: never worse than the start
    assert _lm_loss(tuned, val) <= initial * (1 + 1e-5)


def test_gpt2_conv1d_masks_held_in_their_own_orientation():
    model = tiny_gpt2(seed=3)
    ids = learnable(n=12, length=16, seed=8)
    pruned = bs.prune(model, ids, "magnitude", 0.5).model
    conv = [n for n, m in pruned.named_modules() if type(m).__name__ == "Conv1D"]
    assert conv
    zeros = _zeros(pruned, conv)
    assert all(z.float().mean() > 0.3 for z in zeros.values())
    tuned = bs.finetune(pruned, ids, epochs=3, lr=1e-2, batch_size=4, val_fraction=0, select="last")
    for n in conv:
        mod = tuned.get_submodule(n)
        assert type(mod).__name__ == "Conv1D"
        assert torch.equal(mod.weight == 0, zeros[n]), n
        assert not torch.equal(mod.weight, pruned.get_submodule(n).weight), n
    assert _lm_loss(tuned, ids) < _lm_loss(pruned, ids)


def test_compacted_structured_model_finetunes_with_its_shapes():
    model = tiny_llama(seed=4, hidden=32)
    ids = learnable(n=12, length=16, seed=9)
    res = bs.prune(model, ids, "magnitude", 0.3, structure="channel")
    small = res.model
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    tuned = bs.finetune(small, ids, epochs=3, lr=1e-2, batch_size=4, val_fraction=0, select="last")
    assert {k: tuple(v.shape) for k, v in tuned.state_dict().items()} == shapes
    assert _lm_loss(tuned, ids) < _lm_loss(small, ids)


def test_bad_token_data_and_options_are_one_line_errors():
    model = tiny_llama(seed=0)
    ids = tokens(n=8, length=16)
    with pytest.raises(BrainsurgeonError, match="out of range|vocab"):
        bs.finetune(model, ids + VOCAB, epochs=1)
    with pytest.raises(BrainsurgeonError, match="not token data"):
        bs.finetune(model, (ids, ids), epochs=1)
    with pytest.raises(BrainsurgeonError, match="own loss"):
        bs.finetune(model, ids, epochs=1, loss_fn=torch.nn.MSELoss())
    with pytest.raises(BrainsurgeonError, match="different sequence shapes"):
        bs.finetune(model, [{"input_ids": ids[:4]}, {"input_ids": ids[4:, :8]}], epochs=1)
    with pytest.raises(BrainsurgeonError, match="options are those of"):
        bs.finetune(model, ids, epochs=1, learning_rate=0.1)
    assert copy.deepcopy(model).state_dict().keys() == model.state_dict().keys()
