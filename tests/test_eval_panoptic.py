"""PQ against panopticapi's algorithm (the copy shipped in cityscapesscripts) on random cases with void and
crowd regions, plus hand-computed cases for each COCO rule."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.formats.coco_panoptic import id_to_rgb
from mask2former.evaluation.panoptic import PanopticEvaluator, gt_panoptic_from_sample, pq_stats_single

try:  # panopticapi's evaluation as shipped in cityscapesscripts; only the oracle comparison needs it
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as oracle
except ImportError:  # pragma: no cover
    oracle = None

IS_THING = [True, True, True, False, False, False]
NAMES = ["shirt", "bag", "shoe", "grass", "brick", "sky"]


# ---------------------------------------------------------------- random cases + oracle


def _distinct_ids(rng, count, large):
    high = (1 << 24) - 1 if large else 64
    return [int(v) for v in rng.choice(np.arange(1, high), size=count, replace=False)]


def random_case(rng, size=64):
    """One image: (gt_map, gt_segments, pred_map, pred_segments) with void, crowd, shifted/dropped/relabelled predictions."""
    height = width = size
    regions = []  # (mask, category, iscrowd)
    bounds = np.sort(rng.choice(np.arange(8, height - 8), size=2, replace=False))
    for top, bottom, category in zip([0, *bounds], [*bounds, height], rng.choice([3, 4, 5], size=3)):
        mask = np.zeros((height, width), bool)
        mask[top:bottom] = True
        regions.append([mask, int(category), False])
    crowd_used = set()
    for _ in range(rng.integers(2, 6)):
        y, x = rng.integers(0, height - 10), rng.integers(0, width - 10)
        h, w = rng.integers(6, 24), rng.integers(6, 24)
        mask = np.zeros((height, width), bool)
        mask[y : y + h, x : x + w] = True
        category = int(rng.integers(0, 3))
        crowd = category not in crowd_used and rng.random() < 0.3
        if crowd:
            crowd_used.add(category)
        for region in regions:  # things occlude what is below
            region[0] &= ~mask
        regions.append([mask, category, crowd])
    void = np.zeros((height, width), bool)
    y, x = rng.integers(0, height - 8, size=2)
    void[y : y + rng.integers(4, 20), x : x + rng.integers(4, 20)] = True
    void[:, rng.integers(0, width)] = True
    gt_ids = _distinct_ids(rng, len(regions) + 1, large=rng.random() < 0.5)
    gt_map = np.zeros((height, width), np.int64)
    gt_segments = []
    for (mask, category, crowd), segment_id in zip(regions, gt_ids):
        gt_map[mask & ~void] = segment_id
        gt_segments.append({"id": segment_id, "category_id": category, "iscrowd": int(crowd)})
    if rng.random() < 0.3:  # a listed segment with no pixels left (fully voided): counts as a false negative
        gt_segments.append({"id": gt_ids[-1], "category_id": int(rng.integers(0, 6)), "iscrowd": 0})
    for info in gt_segments:
        info["area"] = int((gt_map == info["id"]).sum())

    pred_regions = []
    for mask, category, _ in regions:
        if rng.random() < 0.15:
            continue
        shifted = np.roll(mask, (int(rng.integers(-5, 6)), int(rng.integers(-5, 6))), axis=(0, 1))
        if rng.random() < 0.15:
            category = int(rng.integers(0, 6))
        pred_regions.append((shifted, category))
    for _ in range(rng.integers(0, 3)):
        mask = np.zeros((height, width), bool)
        y, x = rng.integers(0, height - 6, size=2)
        mask[y : y + rng.integers(3, 16), x : x + rng.integers(3, 16)] = True
        pred_regions.append((mask, int(rng.integers(0, 6))))
    order = rng.permutation(len(pred_regions))
    pred_ids = _distinct_ids(rng, len(pred_regions), large=rng.random() < 0.5)
    pred_map = np.zeros((height, width), np.int64)
    for index in order:
        pred_map[pred_regions[index][0]] = pred_ids[index]
    pred_map[rng.random((height, width)) < 0.02] = 0  # scattered unlabelled pixels
    pred_segments = [
        {"id": pred_ids[i], "category_id": pred_regions[i][1]} for i in range(len(pred_regions)) if (pred_map == pred_ids[i]).any()
    ]
    return gt_map, gt_segments, pred_map, pred_segments


def run_oracle(cases, folder):
    """Write the cases in COCO panoptic format (PNG + JSON, dataset ids = contiguous + 1) and run panopticapi's logic."""
    if oracle is None:
        pytest.skip("cityscapesscripts (panopticapi oracle) is not installed")
    (folder / "gt").mkdir()
    (folder / "pred").mkdir()
    pairs = []
    for index, (gt_map, gt_segments, pred_map, pred_segments) in enumerate(cases):
        name = f"{index:04d}.png"
        Image.fromarray(id_to_rgb(gt_map)).save(folder / "gt" / name)
        Image.fromarray(id_to_rgb(pred_map)).save(folder / "pred" / name)
        gt_ann = {"image_id": index, "file_name": name, "segments_info": [{**s, "category_id": s["category_id"] + 1} for s in gt_segments]}
        pred_ann = {"image_id": index, "file_name": name, "segments_info": [{**s, "category_id": s["category_id"] + 1} for s in pred_segments]}
        pairs.append(json.loads(json.dumps((gt_ann, pred_ann))))
    categories = {c + 1: {"id": c + 1, "name": NAMES[c], "isthing": int(IS_THING[c])} for c in range(len(NAMES))}
    stats = oracle.pq_compute_single_core(0, pairs, str(folder / "gt"), str(folder / "pred"), categories)
    return stats, oracle.average_pq(stats, categories)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_equals_panopticapi_on_random_cases(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    cases = [random_case(rng) for _ in range(15)]
    stats, expected = run_oracle(cases, tmp_path)
    evaluator = PanopticEvaluator(IS_THING, NAMES)
    for gt_map, gt_segments, pred_map, pred_segments in cases:
        evaluator.update(torch.from_numpy(pred_map), pred_segments, torch.from_numpy(gt_map), gt_segments)
    results = evaluator.compute()
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq"):
            assert results[group][key.upper()] == pytest.approx(expected[group][key], abs=1e-6), (group, key)
        assert results[group]["n"] == expected[group]["n"]
    for c in range(len(NAMES)):
        row, truth = results["per_class"][NAMES[c]], stats[c + 1]
        assert (row["TP"], row["FP"], row["FN"]) == (truth.tp, truth.fp, truth.fn), NAMES[c]
        if truth.tp + truth.fp + truth.fn:
            assert row["PQ"] == pytest.approx(expected["per_class"][c + 1]["pq"], abs=1e-6)
        else:
            assert math.isnan(row["PQ"])
    # the random cases do exercise every rule
    assert sum(s.tp for s in stats.pq_per_cat.values()) > 20
    assert sum(s.fp for s in stats.pq_per_cat.values()) > 5 and sum(s.fn for s in stats.pq_per_cat.values()) > 5
    assert any(info["iscrowd"] for case in cases for info in case[1])


# ---------------------------------------------------------------- hand cases


def single(gt_map, gt_segments, pred_map, pred_segments, num_classes=2):
    return pq_stats_single(torch.tensor(pred_map), pred_segments, torch.tensor(gt_map), gt_segments, num_classes)


def test_union_leaves_out_prediction_pixels_in_void():
    gt = np.zeros((4, 8), int)
    gt[0:2, 0:5] = 1  # 10 pixels; everything else is void
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 0}]
    pred = np.zeros((4, 8), int)
    pred[1, 0:5] = 7  # 5 pixels on the segment
    pred[2, 0:6] = 7  # 6 pixels in void: IoU = 5 / (10 + 11 - 5 - 6) = 0.5, not > 0.5
    stats = single(gt, gt_segments, pred, [{"id": 7, "category_id": 0}])
    assert stats["tp"][0] == 0 and stats["fn"][0] == 1
    assert stats["fp"][0] == 0  # 6 of its 11 pixels are void (> 50%): not a false positive
    pred[0, 0] = 7  # IoU = 6 / (10 + 12 - 6 - 6) = 0.6 (it would be 6 / 16 with void in the union)
    stats = single(gt, gt_segments, pred, [{"id": 7, "category_id": 0}])
    assert stats["tp"][0] == 1 and stats["fn"][0] == 0 and stats["iou"][0] == pytest.approx(0.6)


def test_iou_exactly_half_is_not_a_match():
    gt = np.zeros((2, 8), int)
    gt[0, 0:8] = 1
    gt[1, :] = 2
    pred = np.zeros((2, 8), int)
    pred[0, 0:6] = 5
    pred[1, 0:4] = 5  # 6 on gt 1, 4 on gt 2: IoU = 6 / (8 + 10 - 6) = 0.5
    pred[0, 6:8] = 6
    pred[1, 4:8] = 6
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0}]
    stats = single(gt, gt_segments, pred, [{"id": 5, "category_id": 0}, {"id": 6, "category_id": 1}])
    assert stats["tp"].tolist() == [0, 0] and stats["fn"].tolist() == [1, 1] and stats["fp"].tolist() == [1, 1]


def test_crowd_is_never_matched_nor_missed_and_hides_same_category_predictions():
    gt = np.zeros((4, 10), int)
    gt[0:2] = 1  # crowd, category 0, 20 pixels
    gt[2:4] = 2  # category 1
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 1}, {"id": 2, "category_id": 1, "iscrowd": 0}]
    pred = np.full((4, 10), 3)
    pred[0:2] = 4  # exactly on the crowd region
    # category 0 on the crowd: not matched (crowd), not FP (100% in crowd of its own category)
    stats = single(gt, gt_segments, pred, [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 0}])
    assert stats["tp"].tolist() == [0, 1] and stats["fp"].tolist() == [0, 0] and stats["fn"].tolist() == [0, 0]
    # the same region predicted as category 1: the crowd is of another category, so it is a false positive
    stats = single(gt, gt_segments, pred, [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 1}])
    assert stats["fp"].tolist() == [0, 1]


def test_several_crowd_segments_of_a_category_all_count():
    gt = np.zeros((2, 10), int)
    gt[0] = 1
    gt[1] = 2  # two crowd segments of category 0
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 1}, {"id": 2, "category_id": 0, "iscrowd": 1}]
    pred = np.full((2, 10), 9)  # 50% on each crowd segment
    stats = single(gt, gt_segments, pred, [{"id": 9, "category_id": 0}])
    assert stats["fp"].tolist() == [0, 0]  # panopticapi would use only the last crowd segment (50%, not > 50%)


def test_gt_from_sample_and_empty_segment_is_a_false_negative():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, 2:, :2] = True  # mask 2 stays empty
    sample = {"labels": torch.tensor([1, 0, 0]), "masks": masks, "iscrowd": torch.tensor([False, True, False]), "image_id": 3}
    segment_map, info = gt_panoptic_from_sample(sample)
    assert segment_map.dtype == torch.int32
    assert segment_map.tolist() == [[1] * 4, [1] * 4, [2, 2, 0, 0], [2, 2, 0, 0]]
    assert info == [
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 8},
        {"id": 2, "category_id": 0, "iscrowd": 1, "area": 4},
        {"id": 3, "category_id": 0, "iscrowd": 0, "area": 0},
    ]
    evaluator = PanopticEvaluator([True, False], ["a", "b"])
    evaluator.update_from_sample((segment_map.clone(), [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 0}]), sample)
    results = evaluator.compute()
    assert results["per_class"]["b"]["TP"] == 1
    assert (results["per_class"]["a"]["TP"], results["per_class"]["a"]["FP"], results["per_class"]["a"]["FN"]) == (0, 0, 1)
    masks[2, 0, 0] = True
    with pytest.raises(ValueError, match="image 3.*overlap"):
        gt_panoptic_from_sample(sample)


def test_bad_inputs_are_named():
    gt = np.ones((2, 2), int)
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 0}]
    evaluator = PanopticEvaluator([True, False])
    with pytest.raises(ValueError, match="image 'x' \\(prediction\\): segment id 5 is in the map"):
        evaluator.update(torch.full((2, 2), 5), [], torch.tensor(gt), gt_segments, image_id="x")
    with pytest.raises(ValueError, match="segment 6 is in segments_info but not in the map"):
        evaluator.update(torch.full((2, 2), 5), [{"id": 5, "category_id": 0}, {"id": 6, "category_id": 0}], torch.tensor(gt), gt_segments)
    with pytest.raises(ValueError, match="category_id 2 outside"):
        evaluator.update(torch.full((2, 2), 5), [{"id": 5, "category_id": 2}], torch.tensor(gt), gt_segments)
    large = torch.full((2, 2), 1 << 23)  # large ids take the sort-based path
    with pytest.raises(ValueError, match=f"image #0 \\(ground truth\\): segment id {1 << 23} is in the map"):
        evaluator.update(large, [{"id": 1 << 23, "category_id": 0}], large.clone(), gt_segments)
    with pytest.raises(ValueError, match="prediction map"):
        evaluator.update(torch.full((2, 3), 5), [{"id": 5, "category_id": 0}], torch.tensor(gt), gt_segments)


def test_merge_summary_table_and_json(tmp_path):
    rng = np.random.default_rng(7)
    cases = [random_case(rng, size=32) for _ in range(6)]
    whole, first, second = (PanopticEvaluator(IS_THING, NAMES) for _ in range(3))
    for index, (gt_map, gt_segments, pred_map, pred_segments) in enumerate(cases):
        args = (torch.from_numpy(pred_map), pred_segments, torch.from_numpy(gt_map), gt_segments)
        whole.update(*args)
        (first if index < 3 else second).update(*args)
    first.merge(second)
    assert json.dumps(first.compute()) == json.dumps(whole.compute())
    assert first.summary()["PQ"] == pytest.approx(100 * whole.compute()["All"]["PQ"])
    table = whole.format_table()
    assert "shirt" in table and "Things" in table
    stuff_only = PanopticEvaluator([False, False])
    assert stuff_only.compute()["Things"]["n"] == 0 and math.isnan(stuff_only.compute()["Things"]["PQ"])
