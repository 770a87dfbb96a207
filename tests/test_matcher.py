import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from random_inputs import random_targets

from mask2former.training.matcher import HungarianMatcher
from mask2former.training.point_sampling import point_sample


def box_mask(size, top, left, bottom, right):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def hand_built_case():
    """3 queries, 2 targets. Query 2 predicts target 0 (class 1, top-left box) and query 0
    predicts target 1 (class 3, bottom-right box); query 1 predicts no-object and an empty mask."""
    num_classes, size = 4, 32
    top_left, bottom_right = box_mask(size, 0, 0, 16, 16), box_mask(size, 16, 16, 32, 32)
    targets = [{"labels": torch.tensor([1, 3]), "masks": torch.stack([top_left, bottom_right])}]
    logits = torch.full((1, 3, num_classes + 1), -5.0)
    logits[0, 2, 1] = logits[0, 0, 3] = logits[0, 1, num_classes] = 5.0
    small = F.interpolate(torch.stack([bottom_right, torch.zeros_like(top_left), top_left])[None].float(), size=8)
    masks = (small * 2 - 1) * 10  # +10 inside, -10 outside, at 1/4 resolution
    return logits, masks, targets


@pytest.mark.parametrize("mask_cost", ["points", "full"])
def test_hand_built_case_has_the_known_assignment(mask_cost):
    logits, masks, targets = hand_built_case()
    matcher = HungarianMatcher(num_points=256, mask_cost=mask_cost)
    ((query_idx, target_idx),) = matcher(logits, masks, targets, generator=torch.Generator().manual_seed(0))
    assert query_idx.tolist() == [0, 2]
    assert target_idx.tolist() == [1, 0]
    assert query_idx.dtype == target_idx.dtype == torch.int64
    # Swapping the class evidence alone does not override two strongly agreeing masks ...
    swapped = logits.clone()
    swapped[0, [0, 2]] = swapped[0, [2, 0]]
    ((query_idx, _),) = matcher(swapped, masks, targets, generator=torch.Generator().manual_seed(0))
    assert query_idx.tolist() == [0, 2]
    # ... but a matcher that only looks at classes follows them.
    class_only = HungarianMatcher(class_weight=1.0, mask_weight=0.0, dice_weight=0.0, mask_cost=mask_cost)
    ((query_idx, target_idx),) = class_only(swapped, masks, targets)
    assert dict(zip(query_idx.tolist(), target_idx.tolist())) == {0: 0, 2: 1}


def test_zero_target_image_returns_empty_indices():
    targets = random_targets([0, 3], num_classes=5, size=32)
    logits, masks = torch.randn(2, 6, 6), torch.randn(2, 6, 8, 8)
    indices = HungarianMatcher(num_points=64)(logits, masks, targets)
    assert [len(q) for q, _ in indices] == [0, 3]
    assert indices[0][0].dtype == indices[0][1].dtype == torch.int64
    assert sorted(indices[1][1].tolist()) == [0, 1, 2]
    assert len(set(indices[1][0].tolist())) == 3


def test_non_finite_costs_are_sanitised_and_counted():
    targets = random_targets([2, 2], num_classes=5, size=32)
    logits, masks = torch.randn(2, 4, 6), torch.randn(2, 4, 8, 8)
    logits[0, 1] = float("nan")
    masks[1, 3, 0, 0] = float("inf")
    matcher = HungarianMatcher(num_points=64)
    with pytest.warns(RuntimeWarning, match=r"non-finite matching costs in batch images \[0, 1\]"):
        indices = matcher(logits, masks, targets)
    assert matcher.num_nonfinite_warnings == 1
    # The broken queries are matched only if nothing valid is left: here 3 valid queries for 2 targets.
    assert 1 not in indices[0][0].tolist()
    assert [len(q) for q, _ in indices] == [2, 2]
    # A clean batch neither warns nor counts.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matcher(torch.randn(2, 4, 6), torch.randn(2, 4, 8, 8), targets)
    assert matcher.num_nonfinite_warnings == 1
    # Everything NaN still gives a full assignment.
    with pytest.warns(RuntimeWarning):
        indices = matcher(torch.full((2, 4, 6), float("nan")), masks, targets)
    assert matcher.num_nonfinite_warnings == 2
    assert [len(q) for q, _ in indices] == [2, 2]


def test_equals_brute_force_search():
    num_queries, num_classes, seed, num_points = 5, 4, 7, 50
    targets = random_targets([3], num_classes, size=24, seed=3)
    torch.manual_seed(1)
    logits, masks = torch.randn(1, num_queries, num_classes + 1) * 2, torch.randn(1, num_queries, 6, 6) * 3
    matcher = HungarianMatcher(num_points=num_points)
    ((query_idx, target_idx),) = matcher(logits, masks, targets, generator=torch.Generator().manual_seed(seed))

    # Independent cost: broadcast BCE/dice over [Q, G, P] at the same points.
    coords = torch.rand(1, num_points, 2, generator=torch.Generator().manual_seed(seed))
    pred_points = point_sample(masks, coords)[0][:, None]  # [Q, 1, P]
    target_points = point_sample(targets[0]["masks"][None].float(), coords)[0][None]  # [1, G, P]
    pred_b, target_b = torch.broadcast_tensors(pred_points, target_points)
    bce = F.binary_cross_entropy_with_logits(pred_b, target_b, reduction="none").mean(-1)
    probs = pred_b.sigmoid()
    dice = 1 - (2 * (probs * target_b).sum(-1) + 1) / (probs.sum(-1) + target_b.sum(-1) + 1)
    cost = 5 * bce + 5 * dice - 2 * logits[0].softmax(-1)[:, targets[0]["labels"]]

    best = min(itertools.permutations(range(num_queries), 3), key=lambda qs: sum(cost[q, g] for g, q in enumerate(qs)))
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == dict(enumerate(best))


def test_equals_transformers_matcher_with_the_same_random_points():
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    num_classes, num_points = 6, 100
    targets = random_targets([2, 4, 1], num_classes, size=48, seed=11)
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 8, num_classes + 1), torch.randn(3, 8, 12, 12) * 2
    reference = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    torch.manual_seed(42)
    expected = reference(masks, logits, [t["masks"].float() for t in targets], [t["labels"] for t in targets])
    torch.manual_seed(42)
    ours = HungarianMatcher(num_points=num_points)(logits, masks, targets)
    for (q, g), (q_ref, g_ref) in zip(ours, expected):
        assert q.tolist() == q_ref.tolist() and g.tolist() == g_ref.tolist()
    # Different points give a different cost; the comparison above relies on identical points.
    matcher = HungarianMatcher(num_points=num_points)
    cost_a = matcher.cost_matrix(logits[0], masks[0], targets[0], torch.Generator().manual_seed(1))
    cost_b = matcher.cost_matrix(logits[0], masks[0], targets[0], torch.Generator().manual_seed(2))
    assert not torch.allclose(cost_a, cost_b)


def test_cost_matrix_is_fp32_under_autocast():
    # CPU autocast would run the pairwise matmuls in bf16; the matcher must stay in fp32.
    targets = random_targets([3], num_classes=4, size=32)
    logits, masks = torch.randn(6, 5), torch.randn(6, 8, 8)
    matcher = HungarianMatcher(num_points=64)
    expected = matcher.cost_matrix(logits, masks, targets[0], torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(logits, masks, targets[0], torch.Generator().manual_seed(0))
        from_half_inputs = matcher.cost_matrix(logits.bfloat16(), masks.bfloat16(), targets[0])
    assert cost.dtype == from_half_inputs.dtype == torch.float32
    torch.testing.assert_close(cost, expected, rtol=0, atol=0)


def test_rejects_malformed_targets():
    logits, masks = torch.randn(2, 4, 6), torch.randn(2, 4, 8, 8)
    good = random_targets([1, 2], num_classes=5, size=32)
    bad_label = [good[0], {"labels": torch.tensor([0, 5]), "masks": good[1]["masks"]}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\].*\[0, 5\)"):
        HungarianMatcher()(logits, masks, bad_label)
    bad_count = [good[0], {"labels": torch.tensor([0]), "masks": good[1]["masks"]}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]"):
        HungarianMatcher()(logits, masks, bad_count)
    with pytest.raises(ValueError, match="1 target dicts for a batch of 2"):
        HungarianMatcher()(logits, masks, good[:1])
    with pytest.raises(ValueError, match="mask_cost"):
        HungarianMatcher(mask_cost="pixels")
