"""Mask AP against pycocotools run directly on the same detections, and hand cases with AP 1.0 / 0.0."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mask2former.evaluation.instance import InstanceEvaluator

NAMES = ["shirt", "bag", "grass"]


def box_mask(shape, y, x, h, w):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[y : y + h, x : x + w] = True
    return mask


def random_image(rng, size=48):
    num_gt = int(rng.integers(1, 5))
    masks, labels = [], []
    for _ in range(num_gt):
        y, x = rng.integers(0, size - 12, size=2)
        masks.append(box_mask((size, size), y, x, *rng.integers(4, 20, size=2)))
        labels.append(int(rng.integers(0, 2)))
    crowd = [bool(rng.random() < 0.2) for _ in range(num_gt)]
    pred_masks, pred_labels, pred_scores = [], [], []
    for mask, label in zip(masks, labels):
        for _ in range(int(rng.integers(0, 3))):
            shift = tuple(int(v) for v in rng.integers(-3, 4, size=2))
            pred_masks.append(torch.roll(mask, shift, dims=(0, 1)))
            pred_labels.append(label if rng.random() < 0.8 else int(rng.integers(0, 2)))
            pred_scores.append(float(rng.random()))
    target = {"masks": torch.stack(masks), "labels": torch.tensor(labels), "iscrowd": torch.tensor(crowd)}
    prediction = {
        "masks": torch.stack(pred_masks) if pred_masks else torch.zeros((0, size, size), dtype=torch.bool),
        "labels": torch.tensor(pred_labels, dtype=torch.long),
        "scores": torch.tensor(pred_scores),
    }
    return prediction, target


def pycocotools_directly(images):
    """COCO dicts written out independently of the evaluator, then COCOeval."""
    dataset = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    detections = []
    for image_id, (prediction, target) in enumerate(images, start=10):
        height, width = target["masks"].shape[-2:]
        dataset["images"].append({"id": image_id, "height": height, "width": width})
        for mask, label, crowd in zip(target["masks"], target["labels"].tolist(), target["iscrowd"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": label + 1,
                "segmentation": rle, "area": int(mask.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": int(crowd),
            })
        for mask, label, score in zip(prediction["masks"], prediction["labels"].tolist(), prediction["scores"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            detections.append({"image_id": image_id, "category_id": label + 1, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_ap_equals_pycocotools_directly():
    rng = np.random.default_rng(0)
    images = [random_image(rng) for _ in range(12)]
    evaluator = InstanceEvaluator(NAMES, is_thing=[True, True, False])
    for prediction, target in images:
        evaluator.update(prediction, target)
    results = evaluator.compute()
    expected = pycocotools_directly(images)
    for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), expected[:6]):
        if value < 0:
            assert math.isnan(results[name]), name
        else:
            assert results[name] == pytest.approx(value, abs=1e-12), name
    assert 0.05 < results["AP"] < 0.95
    assert set(results["per_class"]) == {"shirt", "bag"}


def test_perfect_predictions_give_ap_one_and_crowd_hits_are_ignored():
    shape = (40, 40)
    target = {
        "masks": torch.stack([box_mask(shape, 0, 0, 10, 10), box_mask(shape, 20, 20, 12, 15), box_mask(shape, 0, 25, 10, 10)]),
        "labels": torch.tensor([0, 1, 0]),
        "iscrowd": torch.tensor([False, False, True]),
        "image_id": "img-a",
    }
    prediction = {
        # the top-scoring one covers half of the crowd region: inside a crowd it is ignored, not a false positive
        "masks": torch.stack([target["masks"][0], target["masks"][1], box_mask(shape, 0, 25, 5, 10)]),
        "labels": torch.tensor([0, 1, 0]),
        "scores": torch.tensor([0.5, 0.6, 0.99]),
    }
    evaluator = InstanceEvaluator(NAMES[:2])
    evaluator.update(prediction, target)
    results = evaluator.compute()
    assert results["AP"] == pytest.approx(1.0) and results["AP50"] == pytest.approx(1.0)
    assert results["per_class"] == {"shirt": pytest.approx(1.0), "bag": pytest.approx(1.0)}
    assert evaluator.images[0]["source_id"] == "img-a"


def test_wrong_class_gives_ap_zero_and_no_detections_is_handled():
    shape = (20, 20)
    target = {"masks": box_mask(shape, 2, 2, 8, 8)[None], "labels": torch.tensor([0])}
    wrong = {"masks": target["masks"], "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    evaluator = InstanceEvaluator(NAMES[:2])
    evaluator.update(wrong, target)
    assert evaluator.compute()["AP"] == 0.0
    empty = {"masks": torch.zeros((0, *shape), dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    evaluator = InstanceEvaluator(NAMES[:2])
    evaluator.update(empty, target)
    results = evaluator.compute()
    assert results["AP"] == 0.0 and math.isnan(results["APl"])  # no large object: undefined -> NaN
    assert "shirt" in evaluator.format_table()


def test_merge_equals_single_pass_and_errors():
    rng = np.random.default_rng(3)
    images = [random_image(rng) for _ in range(6)]
    whole, first, second = (InstanceEvaluator(NAMES[:2]) for _ in range(3))
    for index, (prediction, target) in enumerate(images):
        whole.update(prediction, target)
        (first if index < 3 else second).update(prediction, target)
    first.merge(second)
    assert first.compute()["AP"] == pytest.approx(whole.compute()["AP"])
    stuff_prediction = {"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([2]), "scores": torch.tensor([1.0])}
    target = {"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([2]), "image_id": 5}
    with pytest.raises(ValueError, match="image 5: prediction of non-thing class 2"):
        InstanceEvaluator(NAMES, is_thing=[True, True, False]).update(stuff_prediction, target)
    with pytest.raises(ValueError, match="prediction size"):
        InstanceEvaluator(NAMES).update({**stuff_prediction, "masks": torch.ones(1, 5, 4, dtype=torch.bool)}, target)
