"""Scoring a model on a data set whose classes are a subset of the model's (a panoptic model on its instance JSON):
classes matched by id and name, predictions restated in the data set's ids, those of other classes not scored.
Oracles: hand-computed cases, the same model scored on the full (panoptic) annotations of the same images, and
pycocotools reading the saved results files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mask2former.cli import main
from mask2former.config import load_config
from mask2former.data import FashionScenes
from mask2former.data.export import export_samples
from mask2former.data.label_space import LabelSpace, builtin_label_space
from mask2former.evaluation.label_subset import LabelSubset
from mask2former.evaluation.semantic import SemanticEvaluator
from mask2former.modeling.model import Mask2Former

from test_train import TINY, train_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from score_with_standard_tools import mask_ap  # noqa: E402


# ----- matching the classes -------------------------------------------------------------------------------


def test_coco_panoptic_classes_map_onto_coco_instance_by_id_and_name():
    panoptic, instance = builtin_label_space("coco_panoptic"), builtin_label_space("coco_instance")
    class_map = panoptic.class_map_to(instance)
    assert class_map.shape == (133,) and (class_map >= 0).sum() == 80
    for index in range(133):
        if panoptic.is_thing[index]:
            target = class_map[index]
            assert (instance.names[target], instance.dataset_ids[target]) == (panoptic.names[index],
                                                                              panoptic.dataset_ids[index])
        else:
            assert class_map[index] == -1
    subset = LabelSubset(panoptic, instance)
    assert not subset.is_identity and len(subset.unscored_names) == 53 and "sky-other-merged" in subset.unscored_names
    # Colours and the ignore value need not agree; the same classes are the identity.
    recoloured = LabelSpace(panoptic.names, panoptic.is_thing, panoptic.dataset_ids, ignore_index=1000)
    assert LabelSubset(panoptic, recoloured).is_identity


def test_classes_the_model_does_not_know_are_refused_by_name():
    panoptic = builtin_label_space("coco_panoptic")
    data = LabelSpace(["person", "unicorn", "car"], [True, True, True], [1, 999, 3])
    with pytest.raises(ValueError, match=r"^here: the data set has 1 class\(es\) the model does not know \(matched by "
                                         r"id and name\): 'unicorn' \(id 999\)$"):
        panoptic.class_map_to(data, "here")
    # The same name under another id is another class (COCO's ids are part of the match, as in detectron2).
    with pytest.raises(ValueError, match=r"'person' \(id 2\)"):
        panoptic.class_map_to(LabelSpace(["person"], [True], [2]))
    with pytest.raises(ValueError, match=r"class\(es\) 'person' are things in one of the model and the data set"):
        panoptic.class_map_to(LabelSpace(["person"], [False], [1]))


# ----- restating predictions, hand-computed ------------------------------------------------------------------


def _spaces():
    model = LabelSpace(["cat", "grass", "dog", "sky"], [True, False, True, False], [5, 6, 7, 8])
    data = LabelSpace(["dog", "cat", "grass"], [True, True, False], [7, 5, 6])  # another order, no sky
    return model, data


def test_predictions_of_other_classes_are_not_scored_as_any_class():
    subset = LabelSubset(*_spaces())
    assert subset.class_map.tolist() == [1, 2, 0, -1] and subset.unscored_names == ["sky"]
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    instances = {"masks": masks, "labels": torch.tensor([2, 3, 0]), "scores": torch.tensor([0.9, 0.8, 0.7]),
                 "boxes": torch.zeros(3, 4)}
    restated = subset.instance(instances)
    assert restated["labels"].tolist() == [0, 1] and restated["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert restated["masks"].shape == (2, 2, 2) and restated["boxes"].shape == (2, 4)

    segment_map = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    info = [{"id": 1, "category_id": 3, "isthing": False}, {"id": 2, "category_id": 1, "isthing": False},
            {"id": 3, "category_id": 0, "isthing": True, "score": 0.5}]
    new_map, new_info = subset.panoptic(segment_map, info)
    assert new_map.tolist() == [[0, 2], [3, 0]]  # the sky segment is void
    assert new_info == [{"id": 2, "category_id": 2, "isthing": False},
                        {"id": 3, "category_id": 1, "isthing": True, "score": 0.5}]

    assert subset.semantic(torch.tensor([[0, 1], [2, 3]])).tolist() == [[1, 2], [0, -1]]


def test_semantic_no_class_pixels_are_misses():
    # Ground truth (data ids): dog dog / cat ignore; prediction: dog, none, none, none.
    evaluator = SemanticEvaluator(3, class_names=["dog", "cat", "grass"])
    evaluator.update(torch.tensor([[0, -1], [-1, -1]]), torch.tensor([[0, 0], [1, 255]]))
    result = evaluator.compute()
    # dog: TP 1, GT 2, predicted 1 -> IoU 1/2; cat: TP 0, GT 1 -> IoU 0; grass: undefined.
    assert result["per_class"]["dog"]["IoU"] == pytest.approx(0.5) and result["per_class"]["cat"]["IoU"] == 0.0
    assert math.isnan(result["per_class"]["grass"]["IoU"]) and result["mIoU"] == pytest.approx(0.25)
    assert result["pACC"] == pytest.approx(1 / 3) and result["per_class"]["cat"]["gt_pixels"] == 1
    with pytest.raises(ValueError, match="class id -2"):
        evaluator.update(torch.tensor([-2]), torch.tensor([0]))
    other = SemanticEvaluator(3, class_names=["dog", "cat", "grass"])
    other.merge(evaluator)
    assert other.compute()["mIoU"] == pytest.approx(0.25)


# ----- end to end: the same model on the panoptic and on the instance annotations of the same images ----------


@pytest.fixture(scope="module")
def fashion_model(tmp_path_factory):
    """The default (FashionScenes) model, trained for 2 steps by `mask2former train`."""
    out = tmp_path_factory.mktemp("run")
    train_tiny(out)
    return out / "model_final"


def _evaluate(checkpoint, dataset, root, tasks, out, saved=None) -> dict:
    args = ["evaluate", "--checkpoint", str(checkpoint), "--tasks", tasks, f"data.dataset={dataset}",
            f"data.root={root}", "--out", str(out)]
    assert main(args + (["--save-predictions", str(saved)] if saved else [])) == 0
    return json.loads(Path(out).read_text())


def test_default_model_scores_the_same_ap_on_its_coco_instance_export(fashion_model, tmp_path, capsys):
    panoptic_root, instance_root = tmp_path / "panoptic", tmp_path / "instance"
    common = ["--num-images", "3", "--seed", "4"]
    assert main(["data", "export", "fashion-scenes", str(panoptic_root), "--format", "coco-panoptic", *common]) == 0
    assert main(["data", "export", "fashion-scenes", str(instance_root), "--format", "coco-instance", *common]) == 0
    full = _evaluate(fashion_model, "coco_panoptic", panoptic_root, "panoptic,instance,semantic", tmp_path / "a.json",
                     tmp_path / "full")
    capsys.readouterr()
    subset = _evaluate(fashion_model, "coco", instance_root, "instance", tmp_path / "b.json", tmp_path / "subset")
    printed = capsys.readouterr().out
    assert "scored on the data set's 10 of the model's" in printed and "are not scored as any class" in printed
    assert {"PQ", "mIoU", "AP"} <= full["metrics"].keys() and "PQ" not in subset["metrics"]
    assert "unscored_classes" not in full and subset["unscored_classes"] == FashionScenes(
        "val", num_images=1).label_space.names[10:]  # the textures (stuff), which the instance JSON lacks
    for key in ("AP", "AP50", "AP75"):
        assert subset["metrics"][key] == pytest.approx(full["metrics"][key], abs=1e-9, nan_ok=True), key
    assert subset["details"]["instance"] == full["details"]["instance"]
    # The same detections, in the data set's category ids (the things keep theirs: 1..10), scored by pycocotools.
    detections = json.loads((tmp_path / "subset" / "instances.json").read_text())
    assert detections == json.loads((tmp_path / "full" / "instances.json").read_text())
    assert detections and {entry["category_id"] for entry in detections} <= set(range(1, 11))
    assert subset["metrics"]["AP"] == pytest.approx(mask_ap(instance_root, tmp_path / "subset", "val"), abs=1e-9)


def _annotations_from_predictions(model, count: int):
    """Ground truth that the model partly gets right, so that its AP is not 0: on FashionScenes images, up to three
    disjoint thing masks the model predicts (with its labels) and one stuff segment for the rest."""
    from mask2former.inference.predictor import Predictor

    coco = builtin_label_space("coco_panoptic")
    predictor = Predictor(model, task="instance", **load_config("fashion_scenes_lite0").test.predictor_options())
    scenes = FashionScenes("val", num_images=count, seed=2, image_size=64)
    for index in range(count):
        image = scenes[index]["image"]
        instances = predictor.predict_tasks([image], ("instance",))[0]["instance"]
        taken = torch.zeros(image.shape[1:], dtype=torch.bool)
        labels, masks = [], []
        for mask, label in zip(instances["masks"], instances["labels"].tolist()):
            if len(labels) < 3 and mask.any() and not (mask & taken).any():
                labels.append(label)
                masks.append(mask)
                taken |= mask
        labels.append(coco.stuff_ids[index])
        masks.append(~taken)
        yield {"image": image, "labels": torch.tensor(labels), "masks": torch.stack(masks),
               "iscrowd": torch.zeros(len(labels), dtype=torch.int64), "image_id": index + 1}


def test_coco_panoptic_model_on_a_coco_instance_json(tmp_path):
    coco_panoptic = builtin_label_space("coco_panoptic")
    config = load_config("fashion_scenes_lite0", TINY).model
    config.num_classes = coco_panoptic.num_classes
    torch.manual_seed(3)
    model = Mask2Former(config, labels=coco_panoptic.to_dict()).eval()
    model.save_pretrained(tmp_path / "model")
    root = tmp_path / "coco"
    export_samples(_annotations_from_predictions(model, 3), coco_panoptic, root, "coco-panoptic")
    instances = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert LabelSpace.from_coco_categories(instances["categories"]) == builtin_label_space("coco_instance")

    full = _evaluate(tmp_path / "model", "coco_panoptic", root, "panoptic,instance,semantic", tmp_path / "a.json",
                     tmp_path / "full")
    # The command: mask2former evaluate --checkpoint M --tasks instance data.dataset=coco data.root=X
    subset = _evaluate(tmp_path / "model", "coco", root, "instance", tmp_path / "b.json", tmp_path / "saved")
    assert full["metrics"]["AP"] > 10  # the ground truth holds some of the model's own masks
    assert subset["details"]["instance"] == full["details"]["instance"]
    saved = json.loads((tmp_path / "saved" / "instances.json").read_text())
    assert saved == json.loads((tmp_path / "full" / "instances.json").read_text())
    assert {entry["category_id"] for entry in saved} <= set(builtin_label_space("coco_instance").dataset_ids)
    assert subset["metrics"]["AP"] == pytest.approx(mask_ap(root, tmp_path / "saved", "val"), abs=1e-9)

    # All three tasks on the instance JSON: detections of stuff classes dropped, stuff segments void, stuff pixels
    # misses; the instance AP is the same.
    every = _evaluate(tmp_path / "model", "coco", root, "panoptic,instance,semantic", tmp_path / "c.json",
                      tmp_path / "every")
    assert every["metrics"]["AP"] == pytest.approx(full["metrics"]["AP"], abs=1e-9, nan_ok=True)
    panoptic = json.loads((tmp_path / "every" / "panoptic.json").read_text())
    assert all(segment["category_id"] in builtin_label_space("coco_instance").dataset_ids
               for entry in panoptic["annotations"] for segment in entry["segments_info"])

    # A data set with a class the model does not know is refused, naming it.
    instances["categories"].append({"id": 999, "name": "unicorn", "supercategory": "thing"})
    (root / "annotations" / "instances_val.json").write_text(json.dumps(instances))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--tasks", "instance", "data.dataset=coco",
                 f"data.root={root}"]) == 1


def test_unknown_class_error_is_one_line(tmp_path, capsys):
    scenes = FashionScenes("val", num_images=1, seed=1, image_size=64)
    Mask2Former(load_config("fashion_scenes_lite0", TINY).model,
                labels=scenes.label_space.to_dict()).save_pretrained(tmp_path / "model")
    root = tmp_path / "coco"
    export_samples(scenes, scenes.label_space, root, "coco-instance")
    path = root / "annotations" / "instances_val.json"
    document = json.loads(path.read_text())
    document["categories"][0]["name"] = "tunic"
    path.write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--tasks", "instance", "data.dataset=coco",
                 f"data.root={root}"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "the data set has 1 class(es) the model does not know" in error
    assert "'tunic' (id 1)" in error and str(tmp_path / "model") in error
