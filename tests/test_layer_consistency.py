"""mIoU-L and Util on a hand-built three-prediction case."""

import math

import pytest
import torch

from mask2former.evaluation.layer_consistency import LayerConsistency, mask_predictions_from_outputs

ON, OFF = 3.0, -3.0


def logits(*cells):
    """[2, 4] mask logits, ON at the given (row, col) cells."""
    mask = torch.full((2, 4), OFF)
    for row, col in cells:
        mask[row, col] = ON
    return mask


def build_case():
    garbage = torch.randn(2, 4)
    # predictions[layer][image][query]
    image0 = [
        [logits((0, 0), (0, 1)), garbage, logits()],
        [logits((0, 0), (0, 1), (0, 2), (0, 3)), garbage, logits()],
        [logits((0, 0), (0, 1), (0, 2), (0, 3)), garbage, logits((1, 0), (1, 1), (1, 2), (1, 3))],
    ]
    image1 = [
        [garbage, logits((0, 0), (0, 1), (0, 2)), garbage],
        [garbage, logits((0, 1), (0, 2), (0, 3)), garbage],
        [garbage, logits((0, 1), (0, 2), (0, 3)), garbage],
    ]
    predictions = [torch.stack([torch.stack(image0[layer]), torch.stack(image1[layer])]) for layer in range(3)]
    pair = lambda q, t: (torch.tensor(q), torch.tensor(t))  # noqa: E731
    indices = [
        [pair([1, 0], [0, 1]), pair([0], [0])],  # target 0 of image 0 and the object of image 1 on other queries
        [pair([2, 0], [0, 1]), pair([1], [0])],
        [pair([0, 2], [1, 0]), pair([1], [0])],  # final matching, in another order
    ]
    return predictions, indices


def test_hand_computed_miou_l_and_util():
    predictions, indices = build_case()
    metric = LayerConsistency()
    metric.update(predictions, indices)
    results = metric.compute()
    # image 0: query 0 IoU 2/4 then 1; query 2 empty/empty (1) then empty vs 4 pixels (0); image 1: 2/4 then 1
    assert results["mIoU_L"] == pytest.approx([((0.5 + 1.0) / 2 + 0.5) / 2, ((1.0 + 0.0) / 2 + 1.0) / 2])
    assert results["Util"] == pytest.approx([1 / 3, 1.0, 1.0])
    assert results["mean_Util"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert results["mean_mIoU_L"] == pytest.approx((0.625 + 0.75) / 2)
    assert results["num_objects"] == 3 and results["num_images"] == 2
    assert "mean" in metric.format_table()


def test_accumulates_and_skips_images_without_objects():
    predictions, indices = build_case()
    metric = LayerConsistency()
    metric.update(predictions, indices)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    metric.update([p[:1] for p in predictions], [[empty] for _ in range(3)])
    metric.update(predictions, indices)
    assert metric.compute()["mIoU_L"] == pytest.approx([0.625, 0.75])
    assert metric.compute()["num_objects"] == 6


def test_outputs_helper_and_errors():
    predictions, indices = build_case()
    outputs = {"pred_masks": predictions[2], "aux_outputs": [{"pred_masks": predictions[0]}, {"pred_masks": predictions[1]}]}
    assert all(a is b for a, b in zip(mask_predictions_from_outputs(outputs), predictions))
    assert math.isnan(LayerConsistency().compute()["mean_Util"])
    with pytest.raises(ValueError, match="2 matching results for 3 predictions"):
        LayerConsistency().update(predictions, indices[:2])
    with pytest.raises(ValueError, match="matching for 1 images"):
        LayerConsistency().update(predictions, [row[:1] for row in indices])
