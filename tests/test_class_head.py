"""model.weights: the class head follows the class names; everything else loads strictly (modeling/finetune.py)."""

import dataclasses

import pytest
import torch
from conftest import tiny_swin_config

from mask2former.interop.class_head import CLASS_BIAS, CLASS_WEIGHT, LABEL_EMBED, match_classes
from mask2former.interop.errors import CheckpointError
from mask2former.modeling.finetune import finetune_model_config, load_by_class_names, model_from_weights
from mask2former.modeling.model import Mask2Former

OLD = ["cat", "dog", "car", "sky"]
OLD_THING = [True, True, True, False]
NEW = ["Dog", "tree", "cat"]  # "Dog" matches "dog" case-insensitively; "tree" is new; "car", "sky" are dropped


def labels(names, things):
    return {"names": list(names), "is_thing": list(things), "dataset_ids": list(range(1, len(names) + 1)),
            "ignore_index": 255}


def tiny(num_classes, **overrides):
    return tiny_swin_config(num_classes=num_classes, **{"dec_layers": 2, "enc_layers": 1, "mask_piloting": True,
                                                        **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = Mask2Former(tiny(4), labels=labels(OLD, OLD_THING))
    with torch.no_grad():  # distinct values everywhere, so that a copied row cannot equal a fresh one by chance
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def fresh_model(config, names):
    torch.manual_seed(7)
    return Mask2Former(config, labels=labels(names, [True] * len(names)))


def test_match_classes_by_name_and_fallbacks():
    match = match_classes(OLD, NEW, 4)
    assert match.pairs == [(1, 0), (0, 2)] and match.new_classes == ["tree"] and match.dropped_classes == ["car", "sky"]
    assert "2 of 3 classes matched by name (Dog, cat)" in match.summary()
    assert match_classes(["ankle_boot"], ["Ankle  Boot"], 1).pairs == [(0, 0)]
    # An ambiguous loose match is no match: "A b" would fit "a_b" and "A_B".
    assert match_classes(["a_b", "A_B"], ["A b"], 2).pairs == []
    by_position = match_classes(None, ["x", "y"], 2)
    assert by_position.pairs == [(0, 0), (1, 1)] and "by position" in by_position.summary()
    none = match_classes(None, ["x", "y", "z"], 2)
    assert none.pairs == [] and "no class rows copied" in none.summary()


def test_shared_rows_copied_new_rows_fresh_no_object_kept(checkpoint):
    path, old = checkpoint
    config = dataclasses.replace(tiny(3), weights=str(path))
    torch.manual_seed(7)
    model, report = model_from_weights(config, labels(NEW, [True, True, True]))
    fresh = fresh_model(dataclasses.replace(model.config), NEW).state_dict()
    state = model.state_dict()
    for key, no_object in ((CLASS_WEIGHT, True), (CLASS_BIAS, True), (LABEL_EMBED, False)):
        assert torch.equal(state[key][0], old[key][1])  # Dog <- dog, bit for bit
        assert torch.equal(state[key][2], old[key][0])  # cat <- cat
        assert torch.equal(state[key][1], fresh[key][1])  # tree: the fresh model's initialisation
        assert not torch.equal(state[key][1], old[key][2])
        if no_object:
            assert state[key].shape[0] == 4 and torch.equal(state[key][-1], old[key][-1])
    for key, value in old.items():
        if key not in (CLASS_WEIGHT, CLASS_BIAS, LABEL_EMBED):
            assert torch.equal(state[key], value), key
    assert "2 of 3 classes matched by name (Dog, cat)" in report
    assert "new classes start from a fresh initialisation: tree" in report
    assert "not used: car, sky" in report and LABEL_EMBED in report and CLASS_WEIGHT in report


def test_checkpoint_without_piloting_gets_a_fresh_label_embedding(checkpoint):
    path, old = checkpoint
    model = fresh_model(tiny(3, mask_piloting=False), NEW)
    state = {k: v for k, v in old.items() if k != LABEL_EMBED}
    piloted = fresh_model(tiny(3), NEW)
    expected = piloted.state_dict()[LABEL_EMBED].clone()
    report = load_by_class_names(piloted, state, labels(OLD, OLD_THING), "ckpt")
    assert torch.equal(piloted.state_dict()[LABEL_EMBED], expected)
    assert f"not in the checkpoint, initialised fresh: {LABEL_EMBED}" in report
    # and the other way round: a label embedding the model has no use for is listed, not loaded
    report = load_by_class_names(model, old, labels(OLD, OLD_THING), "ckpt")
    assert f"not used: {LABEL_EMBED}" in report


def test_other_shape_mismatch_is_one_line_error_and_model_untouched(checkpoint):
    _, old = checkpoint
    model = fresh_model(tiny(3), NEW)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = "transformer_decoder.query_feat.weight"
    broken = dict(old, **{key: old[key][:-1]})
    with pytest.raises(CheckpointError) as error:
        load_by_class_names(model, broken, labels(OLD, OLD_THING), "ckpt")
    message = str(error.value)
    assert "\n" not in message and key in message and "(9, 64)" in message and "(10, 64)" in message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # A class head of another width is a mismatch too (only the class count may differ).
    wide = dict(old, **{CLASS_WEIGHT: torch.zeros(5, 32)})
    with pytest.raises(CheckpointError, match=r"class_embed.weight has shape \(5, 32\)"):
        load_by_class_names(model, wide, labels(OLD, OLD_THING), "ckpt")
    extra = dict(old, **{"transformer_decoder.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="extra.weight .* is not part of the model"):
        load_by_class_names(model, extra, labels(OLD, OLD_THING), "ckpt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_checkpoint_without_names_falls_back_to_the_count(checkpoint):
    _, old = checkpoint
    same = fresh_model(tiny(4), ["a", "b", "c", "d"])
    report = load_by_class_names(same, old, None, "ckpt")
    assert torch.equal(same.state_dict()[CLASS_WEIGHT], old[CLASS_WEIGHT]) and "by position" in report
    other = fresh_model(tiny(3), NEW)
    expected = other.state_dict()[CLASS_WEIGHT].clone()
    report = load_by_class_names(other, old, None, "ckpt")
    weight = other.state_dict()[CLASS_WEIGHT]
    assert torch.equal(weight[:3], expected[:3]) and torch.equal(weight[3], old[CLASS_WEIGHT][4])
    assert "no class rows copied" in report


def test_architecture_rule():
    checkpoint = tiny(4)
    config = dataclasses.replace(tiny_swin_config(num_classes=9), dropout=0.3, weights="x")
    merged, notes = finetune_model_config(checkpoint, config)
    assert merged.hidden_dim == checkpoint.hidden_dim and merged.dec_layers == 2  # the checkpoint's architecture
    assert merged.dropout == 0.3 and merged.weights == "x"  # training-time field and the source from the config
    assert any("config values not used" in line and "model.dec_layers=3" in line for line in notes)
    merged, notes = finetune_model_config(checkpoint, config, explicit=["model.dec_layers"])
    assert merged.dec_layers == 3 and any("set explicitly" in line for line in notes)
