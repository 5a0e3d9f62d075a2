"""``ncmcli.nn.Classifier``: the one model object, against explicit references."""

import pytest
import torch

from ncmcli.config.presets import resolve
from ncmcli.nn import Classifier


def _clf(preset="quickstart", overrides=(), classes=4, mean=(0.3,), std=(0.2,)):
    torch.manual_seed(0)
    return Classifier.from_config(
        resolve(preset, list(overrides)), classes, (1, 28, 28), mean=list(mean), std=list(std)
    ).eval()


def test_uint8_input_is_normalised_with_the_classifiers_own_statistics():
    clf = _clf()
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    by_hand = ((x.double() / 255 - 0.3) / 0.2).float()  # float64 reference, then the net's dtype
    with torch.no_grad():
        want = clf.criterion.logits(clf.net(by_hand))
        assert torch.allclose(clf.logits(x), want, atol=1e-5)
        assert torch.allclose(clf(x), want, atol=1e-5)
        assert torch.equal(clf.features(by_hand), clf.net(by_hand))  # a float batch is taken as normalised


def test_predict_is_the_nearest_anchor_in_float64():
    clf = _clf()
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        f = clf.features(x).double()
        a = clf.anchors.double()
        ref = torch.stack([torch.stack([(fi - ac).norm() for ac in a]) for fi in f])  # per sample, per class
        assert torch.equal(clf.predict(x), ref.argmin(1))
        assert torch.allclose(clf.distances(x).double(), ref, atol=1e-5)
        y = torch.arange(16) % 4
        s = clf.criterion.scale_value()
        loss = torch.stack([-torch.log_softmax(-s * ref[i], 0)[y[i]] for i in range(16)]).mean()
        assert clf.loss(x, y).item() == pytest.approx(loss.item(), rel=1e-5)


def test_a_learned_head_has_no_distances_and_names_default_to_indices():
    clf = _clf("quickstart-softmax")
    assert clf.classes == ["0", "1", "2", "3"] and clf.anchors is None
    with pytest.raises(TypeError):
        clf.distances(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_bad_arguments_are_value_errors():
    clf = _clf()
    with pytest.raises(ValueError):
        Classifier(
            clf.net, clf.criterion, classes=list("abcd"), mean=[0.1, 0.2], std=[0.3], input_shape=(1, 28, 28)
        )
    with pytest.raises(ValueError):
        Classifier.from_config(resolve("quickstart", ["anchors.slots=3"]), 4, (1, 28, 28))


def test_a_checkpoint_saves_and_rebuilds_the_classifier(tmp_path):
    from ncmcli.runs import checkpoint

    cfg = resolve("quickstart")
    torch.manual_seed(0)
    clf = Classifier.from_config(cfg, list("wxyz"), (1, 28, 28), mean=[0.25], std=[0.5]).eval()
    checkpoint.save(tmp_path / "c.safetensors", clf, config=cfg, epoch=3, metrics={})
    back = checkpoint.load(tmp_path / "c.safetensors").classifier
    assert isinstance(back, Classifier) and not back.training
    assert (back.classes, back.mean, back.std, back.input_shape) == (list("wxyz"), [0.25], [0.5], (1, 28, 28))
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(back.logits(x), clf.logits(x))


@pytest.mark.parametrize("preset", ["quickstart", "quickstart-softmax"])
def test_extended_keeps_the_old_model_and_makes_room(preset):
    cfg = resolve(preset, ["anchors.slots=8"])
    torch.manual_seed(0)
    old = Classifier.from_config(cfg, ["a", "b", "c"], (1, 28, 28), mean=[0.2], std=[0.4])
    new = old.extended(cfg, ["a", "b", "c", "d", "e"], keep_scale=True)
    assert new.classes == list("abcde") and (new.mean, new.std) == (old.mean, old.std)
    assert all(
        torch.equal(p, q) for p, q in zip(old.net.state_dict().values(), new.net.state_dict().values())
    )
    if old.criterion.uses_anchors:
        assert torch.equal(new.criterion.slot_anchors, old.criterion.slot_anchors)
        assert new.criterion.class_slots[:3].tolist() == old.criterion.class_slots.tolist()
        assert len(set(new.criterion.class_slots.tolist())) == 5
        assert new.criterion.scale_value() == old.criterion.scale_value()
    else:
        w_old, w_new = old.criterion.state_dict(), new.criterion.state_dict()
        weight = next(k for k in w_old if w_old[k].ndim == 2)
        assert torch.equal(w_new[weight][:3], w_old[weight]) and w_new[weight].shape[0] == 5
    with pytest.raises(ValueError):
        old.extended(cfg, ["b", "a", "x"], keep_scale=True)  # the old classes come first, in order
    if old.criterion.uses_anchors:
        with pytest.raises(ValueError, match="free anchor slot"):
            old.extended(cfg, list("abcdefghij"), keep_scale=True)  # 10 classes, 8 slots
