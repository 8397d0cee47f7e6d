"""One public name per method: structure="channel" selects a method's structured variant
(C-OBD for obd, C-OBS for kfac-obs), and whole-model methods (EigenDamage) run through bs.prune."""
import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.data import load_digits
from brainsurgeon.models import LeNet300
from brainsurgeon.registry import get_method, get_variant, supports
from brainsurgeon.structured.second_order import StructuredKFACOBS, StructuredOBD


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    ds = load_digits()
    model = LeNet300((1, 8, 8), hidden=(32, 16))
    from brainsurgeon.train import train_model

    train_model(model, ds.train, epochs=5, lr=3e-3)
    return model, (ds.x_train[:256], ds.y_train[:256])


def test_variants_are_registered_under_the_public_names():
    assert get_variant("obd", "channel") is StructuredOBD
    assert get_variant("kfac-obs", "channel") is StructuredKFACOBS
    assert get_variant("magnitude", "channel") is None
    assert supports("obd", "unstructured") and supports("obd", "channel")
    assert not supports("magnitude", "channel") and not supports("l1-norm", "unstructured")
    assert get_method("obd") is not StructuredOBD  # the unstructured class keeps the name


@pytest.mark.parametrize("method", ["obd", "kfac-obs"])
def test_channel_structure_routes_to_the_variant(trained, method):
    model, data = trained
    res = bs.prune(model, data, method, 0.5, structure="channel")
    assert res.report["method"] == method
    assert res.report["options"]["structure"] == "channel"
    # units really removed: both hidden layers halved, interface kept
    assert res.model.net[1].out_features == 16 and res.model.net[3].out_features == 8
    assert res.model.net[5].out_features == 10 and res.model.net[1].in_features == 64


def test_c_obd_scores_match_the_variant_called_directly(trained):
    model, data = trained
    a = bs.prune(model, data, "obd", 0.5, structure="channel", compact=False)
    b = bs.prune(model, data, "obd", 0.5, structure="channel", compact=False)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)  # deterministic
    x = data[0][:32]
    c = bs.prune(model, data, "obd", 0.5, structure="channel")
    torch.testing.assert_close(a.model(x), c.model(x), rtol=1e-5, atol=1e-5)


def test_eigendamage_through_prune(trained):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bs.prune(model, data, "eigendamage", 0.5, structure="channel", allocation="global")
    assert res.report["method"] == "eigendamage"
    assert res.report["overall"]["achieved_sparsity"] >= 0.5
    assert res.report["overall"]["params_after"] < res.report["overall"]["params_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.model(data[0][:4]).shape == (4, 10)


def test_eigendamage_errors(trained):
    model, data = trained
    with pytest.raises(bs.BrainsurgeonError, match="allocation='global'"):
        bs.prune(model, data, "eigendamage", 0.5, structure="channel")
    with pytest.raises(bs.BrainsurgeonError, match="compact=False"):
        bs.prune(model, data, "eigendamage", 0.5, structure="channel", allocation="global", compact=False)
    with pytest.raises(bs.BrainsurgeonError, match="structure='channel'"):
        bs.prune(model, data, "eigendamage", 0.5)
    with pytest.raises(bs.BrainsurgeonError, match="ekfac"):
        bs.prune(model, data, "eigendamage", 0.5, structure="channel", allocation="global", ekfac="yes")
