"""The built-in label spaces (COCO panoptic / instance, ADE20K, Cityscapes), the presets that carry them, and the
checkpoint loaders that hand them to the model: hand-picked facts and end-to-end thing/stuff behaviour."""

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mask2former.config import PRESET_DIR, load_config, to_dict
from mask2former.data.build import config_label_space
from mask2former.data.label_space import BUILTIN_LABEL_SPACES, LabelSpace, builtin_label_space, match_builtin_names
from mask2former.inference.predictor import Predictor
from mask2former.interop.detectron2 import to_detectron2_state_dict
from mask2former.interop.hf import _labels as hf_labels
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config

# ----- the tables ---------------------------------------------------------------------------------------------


def test_coco_panoptic_table():
    space = builtin_label_space("coco_panoptic")
    assert space.num_classes == 133 and len(space.thing_ids) == 80 and len(space.stuff_ids) == 53
    assert space.ignore_index == 255
    # Things are COCO's 80 instance categories (ids 1..90 with gaps), all before the 53 stuff ids (92..200).
    assert space.thing_ids == list(range(80))
    assert all(space.to_dataset(i) <= 90 for i in space.thing_ids)
    assert sum(value > 90 for value in space.dataset_ids) == 53
    assert space.dataset_ids == sorted(space.dataset_ids) and space.dataset_ids[-1] == 200
    for missing in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91):  # the gaps of COCO's thing ids
        assert missing not in space.dataset_ids
    facts = {  # dataset id: (name, is thing, colour)
        1: ("person", True, (220, 20, 60)),
        3: ("car", True, (0, 0, 142)),
        90: ("toothbrush", True, (191, 162, 208)),
        92: ("banner", False, (255, 255, 128)),
        200: ("rug-merged", False, (250, 141, 255)),
    }
    for dataset_id, (name, thing, color) in facts.items():
        index = space.to_contiguous(dataset_id)
        assert (space.names[index], space.is_thing[index], space.colors[index]) == (name, thing, color)
    assert space.names[80] == "banner" and space.names[79] == "toothbrush"
    assert "sky-other-merged" in space.names and not space.is_thing[space.names.index("sky-other-merged")]


def test_coco_instance_table_is_the_panoptic_things():
    instance, panoptic = builtin_label_space("coco_instance"), builtin_label_space("coco_panoptic")
    assert instance.num_classes == 80 and all(instance.is_thing)
    assert instance.dataset_ids[0] == 1 and instance.dataset_ids[-1] == 90
    assert instance.names == panoptic.names[:80] and instance.colors == panoptic.colors[:80]
    assert instance.to_contiguous(90) == 79 and instance.names[79] == "toothbrush"


def test_cityscapes_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels as oracle_labels

    oracle = sorted((label for label in oracle_labels if label.trainId not in (255, -1)), key=lambda l: l.trainId)
    space = builtin_label_space("cityscapes")
    assert [label.trainId for label in oracle] == list(range(19)) == list(range(space.num_classes))
    assert space.names == [label.name for label in oracle]
    assert space.dataset_ids == [label.id for label in oracle]
    assert space.is_thing == [label.hasInstances for label in oracle]
    assert space.colors == [tuple(label.color) for label in oracle]
    assert [space.names[i] for i in space.thing_ids] == ["person", "rider", "car", "truck", "bus", "train",
                                                         "motorcycle", "bicycle"]
    assert space.ignore_index == 255


def test_ade20k_table():
    space = builtin_label_space("ade20k")
    assert space.num_classes == 150 and not any(space.is_thing) and space.ignore_index == 255
    assert space.dataset_ids == list(range(1, 151))  # raw PNG values; 0 is ignored (reduce-zero-label)
    assert space.names[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert space.names[8] == "window "  # the reference's spelling, trailing space included
    assert space.names[12] == "person" and space.names[-1] == "flag"
    assert space.colors[0] == (120, 120, 120) and space.colors[-1] == (92, 0, 255)


def test_builtin_objects_are_fresh_and_names_are_checked():
    first = builtin_label_space("cityscapes")
    first.names[0] = "changed"
    assert builtin_label_space("cityscapes").names[0] == "road"
    with pytest.raises(ValueError, match="unknown built-in label space 'coco2'"):
        builtin_label_space("coco2")
    for name in BUILTIN_LABEL_SPACES:
        assert match_builtin_names(builtin_label_space(name).names) == name
    assert match_builtin_names(list(reversed(builtin_label_space("cityscapes").names))) is None


def test_coco_instance_json_categories_take_the_builtin_colours():
    # instances_*.json categories carry no colour and no isthing; the known 80 get detectron2's colours.
    table = builtin_label_space("coco_instance")
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(table.dataset_ids, table.names)]
    assert LabelSpace.from_coco_categories(list(reversed(categories))) == table
    other = LabelSpace.from_coco_categories(categories[:3])
    assert other.colors != table.colors[:3]  # not COCO's class list: default colours


# ----- presets ------------------------------------------------------------------------------------------------

EXPECTED = {"coco_panoptic": ("coco_panoptic", 80), "coco_instance": ("coco_instance", 80), "ade20k": ("ade20k", 0),
            "maskformer_ade20k": ("ade20k", 0), "cityscapes": ("cityscapes", 8)}


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_")))
def test_every_reference_preset_carries_its_label_space(preset):
    config = load_config(preset)
    space = config_label_space(config)
    assert space is not None and space.num_classes == config.model.num_classes
    family = next((key for key in EXPECTED if preset.startswith(key)), None)
    if family is not None:
        builtin, things = EXPECTED[family]
        assert space == builtin_label_space(builtin) and len(space.thing_ids) == things


def test_explicit_labels_win_over_the_data_set():
    labels = LabelSpace(["a", "b"], [True, False]).to_dict()
    config = load_config("coco_panoptic_r50", [f"labels={yaml.safe_dump(labels, default_flow_style=True).strip()}"])
    assert config_label_space(config) == LabelSpace.from_dict(labels)
    assert config_label_space(load_config("coco_panoptic_r50", ["data.dataset=folder"])) is None


# ----- detectron2 checkpoints with a preset -------------------------------------------------------------------


def tiny_preset(path: Path, preset: str, num_classes: int) -> str:
    """The reference preset with a tiny Swin model (the data set, and so the label space, stay the preset's)."""
    document = {"_base_": str(PRESET_DIR / f"{preset}.yaml"),
                "model": to_dict(tiny_swin_config(num_classes=num_classes))}
    path.write_text(yaml.safe_dump(document))
    return str(path)


def tiny_pkl(path: Path, num_classes: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = Mask2Former(tiny_swin_config(num_classes=num_classes)).eval()
    with open(path, "wb") as file:
        pickle.dump({"model": to_detectron2_state_dict(model), "__author__": "test"}, file)
    return str(path)


@pytest.fixture(scope="module")
def coco_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("coco_pkl")
    pkl = tiny_pkl(directory / "model_final.pkl", 133)
    return Mask2Former.from_pretrained(pkl, config=tiny_preset(directory / "coco.yaml", "coco_panoptic_r50", 133))


def test_detectron2_checkpoint_with_coco_panoptic_preset_gets_the_labels(coco_model):
    space = LabelSpace.from_dict(coco_model.labels)
    assert space == builtin_label_space("coco_panoptic")
    assert len(space.thing_ids) == 80 and space.names[0] == "person" and not space.is_thing[132]


@pytest.mark.parametrize("preset, num_classes, builtin", [
    ("coco_instance_r50", 80, "coco_instance"), ("cityscapes_panoptic_r50", 19, "cityscapes"),
    ("ade20k_semantic_r50", 150, "ade20k"),
])
def test_detectron2_checkpoint_with_other_presets(tmp_path, preset, num_classes, builtin):
    model = Mask2Former.from_pretrained(tiny_pkl(tmp_path / "m.pkl", num_classes),
                                        config=tiny_preset(tmp_path / "p.yaml", preset, num_classes))
    assert LabelSpace.from_dict(model.labels) == builtin_label_space(builtin)


def test_detectron2_class_count_mismatch_warns_and_has_no_labels(tmp_path):
    pkl = tiny_pkl(tmp_path / "five.pkl", 5)
    with pytest.warns(UserWarning, match="5 classes, the model 133"):
        model = Mask2Former.from_pretrained(pkl, config=tiny_preset(tmp_path / "coco.yaml", "coco_panoptic_r50", 133))
    assert model.labels is None and model.num_classes == 133
    # A preset whose class count was changed to the file's keeps no labels either (the names are for 133).
    with open(tmp_path / "coco5.yaml", "w") as file:
        yaml.safe_dump({"_base_": tiny_preset(tmp_path / "coco.yaml", "coco_panoptic_r50", 133),
                        "model": {"num_classes": 5}}, file)
    assert Mask2Former.from_pretrained(pkl, config=str(tmp_path / "coco5.yaml")).labels is None


# ----- the Predictor uses the split ---------------------------------------------------------------------------


def hand_made_outputs(num_classes: int, num_queries: int, person: int, sky: int):
    """Two confident person queries (top quadrants), two confident sky queries (bottom quadrants), the rest
    no-object; masks on an 8x8 grid for a 32x32 image."""
    logits = torch.zeros(1, num_queries, num_classes + 1)
    logits[0, :, num_classes] = 10.0
    masks = torch.full((1, num_queries, 8, 8), -10.0)
    for query, (label, rows, cols) in enumerate([(person, slice(0, 4), slice(0, 4)), (person, slice(0, 4), slice(4, 8)),
                                                 (sky, slice(4, 8), slice(0, 4)), (sky, slice(4, 8), slice(4, 8))]):
        logits[0, query, num_classes] = 0.0
        logits[0, query, label] = 10.0
        masks[0, query, rows, cols] = 10.0
    return SimpleNamespace(pred_logits=logits, pred_masks=masks)


def test_predictor_merges_stuff_and_drops_it_from_instances(coco_model, monkeypatch):
    space = LabelSpace.from_dict(coco_model.labels)
    person, sky = space.names.index("person"), space.names.index("sky-other-merged")
    outputs = hand_made_outputs(133, coco_model.config.num_queries, person, sky)
    monkeypatch.setattr(coco_model, "forward", lambda images, **kwargs: SimpleNamespace(
        pred_logits=outputs.pred_logits.clone(), pred_masks=outputs.pred_masks.clone()))
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    all_things = LabelSpace(space.names, [True] * 133)

    segment_map, segments = Predictor(coco_model, task="panoptic")(image)
    assert sorted((s["category_id"], s["isthing"]) for s in segments) == [(person, True), (person, True), (sky, False)]
    sky_segment = next(s for s in segments if s["category_id"] == sky)
    # One sky segment over both bottom quadrants (away from the blurred quadrant borders).
    assert (segment_map[18:] == sky_segment["id"]).all()
    assert sky_segment["area"] == (segment_map == sky_segment["id"]).sum()
    _, unmerged = Predictor(coco_model, task="panoptic", label_space=all_things)(image)
    assert sorted(s["category_id"] for s in unmerged) == [person, person, sky, sky]

    instances = Predictor(coco_model, task="instance", top_k=4)(image)
    assert instances["labels"].tolist() == [person, person]
    everything = Predictor(coco_model, task="instance", top_k=4, label_space=all_things)(image)
    assert sorted(everything["labels"].tolist()) == [person, person, sky, sky]


# ----- transformers checkpoints -------------------------------------------------------------------------------


def test_hf_id2label_of_a_known_data_set_gets_its_split(caplog):
    names = builtin_label_space("cityscapes").names
    with caplog.at_level("INFO", logger="mask2former.interop.hf"):
        space = LabelSpace.from_dict(hf_labels({"id2label": {str(i): n for i, n in enumerate(names)}}, "config.json"))
    assert space == builtin_label_space("cityscapes")
    assert "id2label is the cityscapes class list" in caplog.text
    # Same names in another order, or a subset: not recognised, every class a thing (as before).
    shuffled = names[1:] + names[:1]
    space = LabelSpace.from_dict(hf_labels({"id2label": dict(enumerate(shuffled))}, "config.json"))
    assert space.names == shuffled and all(space.is_thing) and space.dataset_ids == list(range(19))


def test_hf_coco_panoptic_checkpoint_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    names = builtin_label_space("coco_panoptic").names
    swin = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, feature_size=32, mask_feature_size=32, num_queries=4, decoder_layers=2,
        encoder_layers=1, num_attention_heads=2, dim_feedforward=32, encoder_feedforward_dim=32,
        id2label=dict(enumerate(names)))
    transformers.Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path)
    model = Mask2Former.from_pretrained(tmp_path)
    space = LabelSpace.from_dict(model.labels)
    assert space == builtin_label_space("coco_panoptic")
    assert len(space.thing_ids) == 80 and space.to_dataset(132) == 200
