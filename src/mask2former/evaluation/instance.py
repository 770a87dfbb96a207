"""Instance segmentation mask AP with pycocotools (``COCOeval``, ``iouType="segm"``).

Ground truth is built from the samples (crowd segments become ``iscrowd=1``, which COCOeval never counts
as missed and whose matching detections are ignored); predictions are RLE-encoded masks with scores.
When the evaluator knows the thing/stuff split, only thing classes are evaluated (the detectron2
convention for panoptic data sets); a prediction of a stuff class is then an error. Results are
fractions in [0, 1]; COCOeval's "undefined" (-1, e.g. APs with no small objects) becomes NaN.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = ["InstanceEvaluator", "encode_masks"]

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs (``{"size": [h, w], "counts": bytes}``) of bool masks [N, H, W]."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {array.shape}")
    if array.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))


def _quiet(function, *args):
    """Run a pycocotools call without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


class InstanceEvaluator:
    """Collects ground truth and predictions per image; ``compute()`` runs COCOeval once over all of them."""

    def __init__(
        self,
        class_names: Sequence[str],
        is_thing: Sequence[bool] | Tensor | None = None,
        max_detections: int = 100,
    ) -> None:
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        if num_classes == 0:
            raise ValueError("class_names is empty")
        flags = [True] * num_classes if is_thing is None else [bool(f) for f in torch.as_tensor(is_thing).tolist()]
        if len(flags) != num_classes:
            raise ValueError(f"is_thing has {len(flags)} entries for {num_classes} classes")
        self.evaluated_classes = [c for c in range(num_classes) if flags[c]]
        if not self.evaluated_classes:
            raise ValueError("no thing class to evaluate instance AP on")
        self.max_detections = max_detections
        self.reset()

    @classmethod
    def from_label_space(cls, label_space: Any, max_detections: int = 100) -> "InstanceEvaluator":
        flags = label_space.is_thing_tensor() if hasattr(label_space, "is_thing_tensor") else label_space.is_thing
        return cls(label_space.names, flags, max_detections)

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.gt_annotations: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []

    @property
    def num_images(self) -> int:
        return len(self.images)

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Any], image_id: Any = None) -> None:
        """Add one image.

        ``prediction``: ``{"masks": bool[N, H, W], "labels": int64[N], "scores": float[N]}`` (instance_inference);
        ``target``: a sample dict (``labels``, ``masks``, optional ``iscrowd``) at the prediction's resolution.
        """
        image_id = target.get("image_id", image_id) if image_id is None else image_id
        where = f"image {image_id!r}" if image_id is not None else f"image #{self.num_images}"
        gt_masks = torch.as_tensor(target["masks"]).bool().cpu()
        gt_labels = torch.as_tensor(target["labels"]).long().reshape(-1).cpu()
        if gt_masks.dim() != 3 or gt_masks.shape[0] != gt_labels.numel():
            raise ValueError(f"{where}: target masks {tuple(gt_masks.shape)} do not match {gt_labels.numel()} labels")
        crowd = target.get("iscrowd")
        crowd = torch.zeros_like(gt_labels, dtype=torch.bool) if crowd is None else torch.as_tensor(crowd).bool().cpu()
        pred_masks = torch.as_tensor(prediction["masks"]).bool().cpu()
        pred_labels = torch.as_tensor(prediction["labels"]).long().reshape(-1).cpu()
        pred_scores = torch.as_tensor(prediction["scores"]).float().reshape(-1).cpu()
        if pred_masks.dim() != 3 or not pred_masks.shape[0] == pred_labels.numel() == pred_scores.numel():
            raise ValueError(
                f"{where}: prediction masks {tuple(pred_masks.shape)}, {pred_labels.numel()} labels and "
                f"{pred_scores.numel()} scores do not agree"
            )
        height, width = gt_masks.shape[-2:]
        if tuple(pred_masks.shape[-2:]) != (height, width):
            raise ValueError(f"{where}: prediction size {tuple(pred_masks.shape[-2:])} != target size {(height, width)}")
        num_classes = len(self.class_names)
        for name, labels in (("target", gt_labels), ("prediction", pred_labels)):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"{where}: {name} label outside [0, {num_classes})")
        evaluated = torch.zeros(num_classes, dtype=torch.bool)
        evaluated[self.evaluated_classes] = True
        if pred_labels.numel() and not bool(evaluated[pred_labels].all()):
            bad = int(pred_labels[~evaluated[pred_labels]][0])
            raise ValueError(f"{where}: prediction of non-thing class {bad} ({self.class_names[bad]!r})")

        coco_image_id = self.num_images + 1
        self.images.append({"id": coco_image_id, "height": int(height), "width": int(width), "source_id": image_id})
        if crowd.numel() != gt_labels.numel():
            raise ValueError(f"{where}: iscrowd has {crowd.numel()} entries for {gt_labels.numel()} segments")
        keep_gt = evaluated[gt_labels]  # stuff segments are not instances
        gt_masks, gt_labels, crowd = gt_masks[keep_gt], gt_labels[keep_gt], crowd[keep_gt]
        for rle, label, is_crowd in zip(encode_masks(gt_masks), gt_labels.tolist(), crowd.tolist()):
            self.gt_annotations.append({
                # COCOeval treats a matched-gt id of 0 as "unmatched", so ids start at 1
                "id": len(self.gt_annotations) + 1,
                "image_id": coco_image_id,
                "category_id": label,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": int(is_crowd),
            })
        for rle, label, score in zip(encode_masks(pred_masks), pred_labels.tolist(), pred_scores.tolist()):
            self.detections.append({"image_id": coco_image_id, "category_id": label, "segmentation": rle, "score": score})

    def merge(self, other: "InstanceEvaluator") -> None:
        """Append another evaluator's images (e.g. gathered from another process)."""
        offset, gt_offset = self.num_images, len(self.gt_annotations)
        for image in other.images:
            self.images.append({**image, "id": image["id"] + offset})
        for annotation in other.gt_annotations:
            self.gt_annotations.append(
                {**annotation, "id": annotation["id"] + gt_offset, "image_id": annotation["image_id"] + offset}
            )
        for detection in other.detections:
            self.detections.append({**detection, "image_id": detection["image_id"] + offset})

    def coco_objects(self) -> tuple[COCO, COCO]:
        """(ground truth, detections) as pycocotools COCO objects."""
        categories = [{"id": c, "name": self.class_names[c]} for c in self.evaluated_classes]
        gt = COCO()
        gt.dataset = {"images": list(self.images), "annotations": list(self.gt_annotations), "categories": categories}
        _quiet(gt.createIndex)
        if self.detections:
            detections = _quiet(gt.loadRes, [dict(d) for d in self.detections])
        else:  # loadRes cannot take an empty list
            detections = COCO()
            detections.dataset = {"images": list(self.images), "annotations": [], "categories": categories}
            _quiet(detections.createIndex)
        return gt, detections

    def compute(self) -> dict[str, Any]:
        if not self.images:
            raise ValueError("InstanceEvaluator.compute() called before any update()")
        gt, detections = self.coco_objects()
        evaluator = COCOeval(gt, detections, iouType="segm")
        evaluator.params.maxDets = [1, 10, self.max_detections]
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        results: dict[str, Any] = {
            name: (float(value) if value >= 0 else math.nan) for name, value in zip(_STAT_NAMES, evaluator.stats[:6])
        }
        # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = undefined
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for index, class_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, index]
            values = values[values > -1]
            per_class[self.class_names[class_id]] = float(values.mean()) if values.size else math.nan
        results["per_class"] = per_class
        results["num_images"] = self.num_images
        return results

    def summary(self) -> dict[str, float]:
        """Flat percentages for logging: AP, AP50, AP75, APs, APm, APl."""
        results = self.compute()
        return {name: 100.0 * results[name] for name in _STAT_NAMES}

    def format_table(self, results: dict[str, Any] | None = None) -> str:
        results = results if results is not None else self.compute()
        width = max([5] + [len(name) for name in results["per_class"]])
        lines = [f"{'class':<{width}} | {'AP':>6}", "-" * (width + 9)]
        for name, value in results["per_class"].items():
            lines.append(f"{name:<{width}} | {_pct(value)}")
        lines.append("-" * (width + 9))
        for name in _STAT_NAMES:
            lines.append(f"{name:<{width}} | {_pct(results[name])}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'nan':>6}" if math.isnan(value) else f"{100.0 * value:6.2f}"
