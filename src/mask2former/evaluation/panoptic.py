"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic rules (Kirillov et al.; panopticapi ``pq_compute``).

Per image, segment maps hold one id per pixel (0 = VOID) and ``segments_info`` gives each id's
``category_id`` (contiguous, in [0, K)) and, for the ground truth, ``iscrowd``:

- a prediction and a ground-truth segment match iff they have the same category and IoU > 0.5, where the
  union leaves out the prediction's pixels that lie in VOID;
- crowd ground-truth segments are never matched and never false negatives;
- an unmatched prediction is not a false positive when more than half of its area lies in VOID or in
  crowd regions of its own category;
- per category ``PQ = sum(IoU of TPs) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
  All / Things / Stuff average over the categories with ``TP + FP + FN > 0`` (NaN when there is none).

Two deliberate differences with panopticapi, both outside what COCO data exercises: ground-truth areas
are counted on the map (panopticapi trusts the JSON ``area``), and when one image has several crowd
segments of a category the FP test uses all of them (panopticapi keeps only the last one listed).

The pixel work per image is one ``bincount`` over combined (gt id, pred id) keys (segment ids are first
mapped to positions when they are too large for a direct key); everything else runs on the small
[segments_gt + 1, segments_pred + 1] intersection matrix. Results are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["PanopticEvaluator", "pq_stats_single", "gt_panoptic_from_sample"]

# Maps whose largest id is below this use a dense lookup table instead of a sort-based unique.
_DENSE_LOOKUP_LIMIT = 1 << 20


def gt_panoptic_from_sample(sample: Mapping[str, Any]) -> tuple[Tensor, list[dict[str, Any]]]:
    """Ground-truth panoptic map from a sample dict (``labels``, ``masks``, ``iscrowd``).

    Segment ``i`` of the sample gets id ``i + 1``; pixels covered by no mask are VOID (0). Overlapping
    masks are an error. A segment with an empty mask is kept in ``segments_info`` with area 0, so it counts
    as a false negative exactly as a COCO JSON segment absent from its PNG would.
    """
    where = f"image {sample.get('image_id', '?')!r}"
    for key in ("labels", "masks"):
        if key not in sample:
            raise ValueError(f"{where}: sample has no {key!r} entry")
    labels = torch.as_tensor(sample["labels"]).long().reshape(-1)
    masks = torch.as_tensor(sample["masks"]).bool()
    if masks.dim() != 3 or masks.shape[0] != labels.numel():
        raise ValueError(f"{where}: masks {tuple(masks.shape)} do not match {labels.numel()} labels")
    iscrowd = sample.get("iscrowd")
    iscrowd = torch.zeros_like(labels, dtype=torch.bool) if iscrowd is None else torch.as_tensor(iscrowd).bool()
    if iscrowd.numel() != labels.numel():
        raise ValueError(f"{where}: iscrowd has {iscrowd.numel()} entries for {labels.numel()} segments")
    coverage = masks.sum(0, dtype=torch.int32)
    if masks.shape[0] and int(coverage.max()) > 1:
        raise ValueError(f"{where}: ground-truth masks overlap, a panoptic map needs disjoint segments")
    ids = torch.arange(1, labels.numel() + 1, dtype=torch.int32, device=masks.device)
    segment_map = (masks.to(torch.int32) * ids[:, None, None]).sum(0, dtype=torch.int32)
    if masks.shape[0] == 0:
        segment_map = torch.zeros(masks.shape[-2:], dtype=torch.int32, device=masks.device)
    areas = masks.flatten(1).sum(1).tolist()
    segments_info = [
        {"id": i + 1, "category_id": int(label), "iscrowd": int(crowd), "area": int(area)}
        for i, (label, crowd, area) in enumerate(zip(labels.tolist(), iscrowd.tolist(), areas))
    ]
    return segment_map, segments_info


def _segment_table(
    segments_info: Sequence[Mapping[str, Any]], num_classes: int, where: str
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, category ids, crowd flags) of a segments_info list, validated."""
    ids, categories, crowd = [], [], []
    for info in segments_info:
        segment_id = int(info["id"])
        category = int(info["category_id"])
        if segment_id <= 0:
            raise ValueError(f"{where}: segment id {segment_id} is not positive (0 is VOID)")
        if not 0 <= category < num_classes:
            raise ValueError(f"{where}: segment {segment_id} has category_id {category} outside [0, {num_classes})")
        ids.append(segment_id)
        categories.append(category)
        crowd.append(bool(info.get("iscrowd", 0)))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate segment ids in segments_info")
    return ids, np.asarray(categories, dtype=np.int64), np.asarray(crowd, dtype=bool)


def _pixel_index(segment_map: Tensor, ids: list[int], high: int) -> Tensor:
    """Per pixel: 0 for VOID, i + 1 for segment ``ids[i]``, ``len(ids) + 1`` for an id missing from ``ids``.

    ``high`` is the map's largest id. Unknown ids get their own bucket so that the caller can detect them
    from the bincount, without another pass over the pixels.
    """
    flat = segment_map.reshape(-1)
    device = flat.device
    unknown = len(ids) + 1
    if high < _DENSE_LOOKUP_LIMIT:
        lookup = torch.full((high + 1,), unknown, dtype=torch.long, device=device)
        lookup[0] = 0
        # ids above the map's maximum are absent from the map (area 0); they need no table entry
        in_range = [(segment_id, i + 1) for i, segment_id in enumerate(ids) if segment_id <= high]
        if in_range:
            table = torch.tensor(in_range, dtype=torch.long, device=device)
            lookup[table[:, 0]] = table[:, 1]
        # index_select is several times faster than advanced indexing for a gather from a small table
        return torch.index_select(lookup, 0, flat if flat.dtype in (torch.int32, torch.int64) else flat.long())
    values, inverse = torch.unique(flat, return_inverse=True)
    position = {segment_id: i + 1 for i, segment_id in enumerate(ids)}
    position[0] = 0
    table = [position.get(value, unknown) for value in values.tolist()]
    return torch.tensor(table, dtype=torch.long, device=device)[inverse]


def _first_unknown_id(segment_map: Tensor, ids: list[int]) -> int:
    known = torch.tensor([0, *ids], dtype=segment_map.dtype, device=segment_map.device)
    values = torch.unique(segment_map)
    return int(values[~torch.isin(values, known)][0])


def _value_range(segment_map: Tensor, where: str) -> tuple[int, int]:
    if segment_map.numel() == 0:
        return 0, 0
    low, high = (int(v) for v in torch.aminmax(segment_map))
    if low < 0:
        raise ValueError(f"{where}: segment map has negative id {low}")
    return low, high


def _intersection_counts(
    gt_map: Tensor, gt_ids: list[int], pred_map: Tensor, pred_ids: list[int], where: str
) -> np.ndarray:
    """int64 [len(gt_ids) + 1, len(pred_ids) + 1] pixel counts; row/column 0 is VOID, then segments in list order."""
    _, gt_high = _value_range(gt_map, f"{where} (ground truth)")
    _, pred_high = _value_range(pred_map, f"{where} (prediction)")
    columns = pred_high + 1
    if (gt_high + 1) * columns <= max(gt_map.numel(), 1 << 16):
        # Small ids (post-processed maps, maps built from samples): one bincount straight over the raw ids,
        # then pick the rows/columns of the listed segments; an extra zero row/column stands in for ids
        # that are listed but absent from the map.
        keys = torch.add(pred_map.reshape(-1).to(torch.int32), gt_map.reshape(-1).to(torch.int32), alpha=columns)
        full = torch.bincount(keys, minlength=(gt_high + 1) * columns).reshape(gt_high + 1, columns).cpu().numpy()
        full = np.pad(full.astype(np.int64), ((0, 1), (0, 1)))
        rows = np.array([0, *[i if i <= gt_high else gt_high + 1 for i in gt_ids]])
        cols = np.array([0, *[i if i <= pred_high else pred_high + 1 for i in pred_ids]])
        for axis, selected, name in ((0, rows, "ground truth"), (1, cols, "prediction")):
            listed = np.zeros(full.shape[axis], bool)
            listed[selected] = True
            totals = full.sum(1 - axis)
            unlisted = np.flatnonzero((totals > 0) & ~listed)
            if unlisted.size:
                raise ValueError(f"{where} ({name}): segment id {int(unlisted[0])} is in the map but not in segments_info")
        return full[np.ix_(rows, cols)]
    # Large ids (e.g. RGB-encoded COCO panoptic ids): map them to segment positions first.
    gt_index = _pixel_index(gt_map, gt_ids, gt_high)
    pred_index = _pixel_index(pred_map, pred_ids, pred_high)
    rows, columns = len(gt_ids) + 2, len(pred_ids) + 2  # void, segments..., unknown id
    joint = torch.bincount(torch.add(pred_index, gt_index, alpha=columns), minlength=rows * columns)
    counts = joint.reshape(rows, columns).cpu().numpy().astype(np.int64)
    if counts[-1].any():
        unknown = _first_unknown_id(gt_map, gt_ids)
        raise ValueError(f"{where} (ground truth): segment id {unknown} is in the map but not in segments_info")
    if counts[:, -1].any():
        unknown = _first_unknown_id(pred_map, pred_ids)
        raise ValueError(f"{where} (prediction): segment id {unknown} is in the map but not in segments_info")
    return counts[:-1, :-1]


def pq_stats_single(
    pred_map: Tensor,
    pred_segments: Sequence[Mapping[str, Any]],
    gt_map: Tensor,
    gt_segments: Sequence[Mapping[str, Any]],
    num_classes: int,
    where: str = "image",
) -> dict[str, np.ndarray]:
    """Per-category ``iou`` (sum over TPs, float64), ``tp``, ``fp``, ``fn`` (int64) arrays of length K for one image."""
    pred_map = torch.as_tensor(pred_map)
    gt_map = torch.as_tensor(gt_map).to(pred_map.device)
    if pred_map.shape != gt_map.shape:
        raise ValueError(f"{where}: prediction map {tuple(pred_map.shape)} != ground-truth map {tuple(gt_map.shape)}")
    gt_ids, gt_category, gt_crowd = _segment_table(gt_segments, num_classes, f"{where} (ground truth)")
    pred_ids, pred_category, _ = _segment_table(pred_segments, num_classes, f"{where} (prediction)")
    counts = _intersection_counts(gt_map, gt_ids, pred_map, pred_ids, where)
    gt_area = counts[1:].sum(1)
    pred_area = counts[:, 1:].sum(0)
    if (pred_area == 0).any():
        missing = pred_ids[int(np.flatnonzero(pred_area == 0)[0])]
        raise ValueError(f"{where} (prediction): segment {missing} is in segments_info but not in the map")
    void_overlap = counts[0, 1:]
    intersection = counts[1:, 1:]

    same_category = gt_category[:, None] == pred_category[None, :]
    candidate = same_category & ~gt_crowd[:, None] & (intersection > 0)
    union = gt_area[:, None] + pred_area[None, :] - intersection - void_overlap[None, :]
    iou = np.where(candidate, intersection / np.maximum(union, 1), 0.0)
    matched = candidate & (iou > 0.5)
    gt_rows, pred_cols = np.nonzero(matched)

    tp = np.bincount(gt_category[gt_rows], minlength=num_classes)
    iou_sum = np.bincount(gt_category[gt_rows], weights=iou[gt_rows, pred_cols], minlength=num_classes)
    gt_matched = matched.any(1)
    fn = np.bincount(gt_category[~gt_matched & ~gt_crowd], minlength=num_classes)
    crowd_overlap = (intersection * (same_category & gt_crowd[:, None])).sum(0)
    ignored = (void_overlap + crowd_overlap) / pred_area > 0.5
    fp = np.bincount(pred_category[~matched.any(0) & ~ignored], minlength=num_classes)
    return {
        "iou": iou_sum.astype(np.float64),
        "tp": tp.astype(np.int64),
        "fp": fp.astype(np.int64),
        "fn": fn.astype(np.int64),
    }


class PanopticEvaluator:
    """Accumulates per-category PQ statistics over images (see the module docstring for the rules)."""

    def __init__(self, is_thing: Sequence[bool] | Tensor, class_names: Sequence[str] | None = None) -> None:
        self.is_thing = np.asarray(torch.as_tensor(is_thing, dtype=torch.bool).cpu().numpy(), dtype=bool).reshape(-1)
        self.num_classes = len(self.is_thing)
        if self.num_classes == 0:
            raise ValueError("is_thing is empty: need one flag per class")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.reset()

    @classmethod
    def from_label_space(cls, label_space: Any) -> "PanopticEvaluator":
        if hasattr(label_space, "is_thing_tensor"):
            flags = label_space.is_thing_tensor()
        else:
            flags = label_space.is_thing
        return cls(flags, label_space.names)

    def reset(self) -> None:
        self.iou = np.zeros(self.num_classes, dtype=np.float64)
        self.tp = np.zeros(self.num_classes, dtype=np.int64)
        self.fp = np.zeros(self.num_classes, dtype=np.int64)
        self.fn = np.zeros(self.num_classes, dtype=np.int64)
        self.num_images = 0
        # Each image's IoU sums, kept so that a merge re-adds them in image order: the same float sum, to the
        # last bit, as one evaluator that saw all the images (K float64 per image).
        self.image_iou: list[np.ndarray] = []

    def update(
        self,
        pred_map: Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_map: Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
        image_id: Any = None,
    ) -> None:
        """Add one image: prediction ``(segment_map, segments_info)`` against the ground truth."""
        where = f"image {image_id!r}" if image_id is not None else f"image #{self.num_images}"
        stats = pq_stats_single(pred_map, pred_segments, gt_map, gt_segments, self.num_classes, where)
        self.iou += stats["iou"]
        self.image_iou.append(stats["iou"])
        self.tp += stats["tp"]
        self.fp += stats["fp"]
        self.fn += stats["fn"]
        self.num_images += 1

    def update_from_sample(self, prediction: tuple[Tensor, Sequence[Mapping[str, Any]]], sample: Mapping[str, Any]) -> None:
        """Add one image given the post-processed prediction and the sample dict it was made from."""
        gt_map, gt_segments = gt_panoptic_from_sample(sample)
        self.update(prediction[0], prediction[1], gt_map, gt_segments, sample.get("image_id"))

    def merge(self, other: "PanopticEvaluator") -> None:
        """Add another evaluator's statistics (e.g. gathered from another process), as if its images came after
        this one's: the IoU sums are re-added image by image, so merged shards equal one pass bit for bit."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge evaluators with {other.num_classes} and {self.num_classes} classes")
        if len(self.image_iou) == self.num_images and len(other.image_iou) == other.num_images:
            self.image_iou.extend(other.image_iou)
            total = np.zeros(self.num_classes, dtype=np.float64)
            for row in self.image_iou:
                total += row
            self.iou = total
        else:  # statistics without per-image rows (set by hand): plain sums
            self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.num_images += other.num_images

    def compute(self) -> dict[str, Any]:
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        present = denominator > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pq = np.where(present, self.iou / denominator, np.nan)
            sq = np.where(present, np.where(self.tp > 0, self.iou / np.maximum(self.tp, 1), 0.0), np.nan)
            rq = np.where(present, self.tp / denominator, np.nan)

        def average(selection: np.ndarray) -> dict[str, Any]:
            chosen = selection & present
            count = int(chosen.sum())
            if count == 0:
                return {"PQ": math.nan, "SQ": math.nan, "RQ": math.nan, "n": 0}
            return {"PQ": float(pq[chosen].mean()), "SQ": float(sq[chosen].mean()), "RQ": float(rq[chosen].mean()), "n": count}

        return {
            "All": average(np.ones_like(self.is_thing)),
            "Things": average(self.is_thing),
            "Stuff": average(~self.is_thing),
            "num_images": self.num_images,
            "per_class": {
                name: {
                    "PQ": float(pq[c]), "SQ": float(sq[c]), "RQ": float(rq[c]),
                    "TP": int(self.tp[c]), "FP": int(self.fp[c]), "FN": int(self.fn[c]),
                    "isthing": bool(self.is_thing[c]),
                }
                for c, name in enumerate(self.class_names)
            },
        }

    def summary(self) -> dict[str, float]:
        """Flat percentages for logging, detectron2 names: PQ, SQ, RQ, PQ_th, ..., RQ_st."""
        results = self.compute()
        flat = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("PQ", "SQ", "RQ"):
                flat[key + suffix] = 100.0 * results[group][key]
        return flat

    def format_table(self, results: dict[str, Any] | None = None) -> str:
        results = results if results is not None else self.compute()
        width = max([8] + [len(name) for name in self.class_names])
        header = f"{'class':<{width}} | {'PQ':>6} {'SQ':>6} {'RQ':>6} | {'TP':>5} {'FP':>5} {'FN':>5}"
        lines = [header, "-" * len(header)]
        for name, row in results["per_class"].items():
            lines.append(
                f"{name:<{width}} | {_pct(row['PQ'])} {_pct(row['SQ'])} {_pct(row['RQ'])} | "
                f"{row['TP']:5d} {row['FP']:5d} {row['FN']:5d}"
            )
        lines.append("-" * len(header))
        for group in ("All", "Things", "Stuff"):
            row = results[group]
            lines.append(f"{group:<{width}} | {_pct(row['PQ'])} {_pct(row['SQ'])} {_pct(row['RQ'])} | n={row['n']}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'nan':>6}" if math.isnan(value) else f"{100.0 * value:6.2f}"
