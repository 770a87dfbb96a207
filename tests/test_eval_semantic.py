"""mIoU and accuracies against a hand-computed confusion matrix."""

import json
import math

import numpy as np
import pytest
import torch

from mask2former.evaluation.semantic import SemanticEvaluator, confusion_matrix


def test_hand_computed_confusion_matrix_and_metrics():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    evaluator = SemanticEvaluator(4, class_names=["a", "b", "c", "d"])
    evaluator.update(pred, target)
    # rows = gt, cols = pred; the two ignored pixels are skipped whatever was predicted there
    expected = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert evaluator.matrix.tolist() == expected
    results = evaluator.compute()
    iou = {"a": 1 / 3, "b": 2 / 3, "c": 1 / 2}
    for name, value in iou.items():
        assert results["per_class"][name]["IoU"] == pytest.approx(value)
    assert math.isnan(results["per_class"]["d"]["IoU"])  # absent in gt and prediction: left out of the mean
    assert results["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert results["pACC"] == pytest.approx(4 / 6)
    assert results["mACC"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert results["fwIoU"] == pytest.approx(2 / 6 * 1 / 3 + 2 / 6 * 2 / 3 + 2 / 6 * 1 / 2)
    assert results["num_images"] == 1


def test_class_only_predicted_has_zero_iou():
    evaluator = SemanticEvaluator(3)
    evaluator.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    results = evaluator.compute()
    assert results["per_class"]["2"]["IoU"] == 0.0 and math.isnan(results["per_class"]["2"]["ACC"])
    assert results["mIoU"] == pytest.approx((0.5 + 0.0) / 2)


def test_accumulates_over_images_like_one_big_matrix():
    rng = np.random.default_rng(0)
    targets = [torch.from_numpy(rng.integers(0, 5, (6, 7))) for _ in range(4)]
    preds = [torch.from_numpy(rng.integers(0, 5, (6, 7))) for _ in range(4)]
    for t in targets:
        t[0, :3] = 255
    evaluator = SemanticEvaluator(5)
    for p, t in zip(preds, targets):
        evaluator.update(p, t)
    brute = np.zeros((5, 5), np.int64)
    for p, t in zip(preds, targets):
        for gt_class, pred_class in zip(t.flatten().tolist(), p.flatten().tolist()):
            if gt_class != 255:
                brute[gt_class, pred_class] += 1
    assert evaluator.matrix.numpy().tolist() == brute.tolist()
    batched = SemanticEvaluator(5)
    batched.update(torch.stack(preds), torch.stack(targets))
    assert torch.equal(batched.matrix, evaluator.matrix) and batched.num_images == 4
    other = SemanticEvaluator(5)
    other.update(preds[0], targets[0])
    other.merge(SemanticEvaluator(5))
    assert other.num_images == 1


def test_json_table_and_summary():
    evaluator = SemanticEvaluator(2, class_names=["grass", "shirt"])
    evaluator.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    results = json.loads(json.dumps(evaluator.compute()))
    assert results["mIoU"] == pytest.approx(0.5)
    table = evaluator.format_table()
    assert "grass" in table and " 50.00" in table
    assert evaluator.summary()["mIoU"] == pytest.approx(50.0)


def test_bad_ids_raise():
    with pytest.raises(ValueError, match="target contains class id 7"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)
    with pytest.raises(ValueError, match="prediction contains class id 3"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
