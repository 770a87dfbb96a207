"""Semantic segmentation metrics from an accumulated confusion matrix.

``IoU_c = TP_c / (GT_c + Pred_c - TP_c)`` over non-ignored pixels. A class that appears neither in the
ground truth nor in the predictions has an undefined IoU (NaN) and is left out of mIoU; mean accuracy
averages over classes present in the ground truth (the detectron2 ``SemSegEvaluator`` / mmseg rules).
A predicted -1 means "none of these classes" (a model class the data set lacks, ``label_subset.py``): the pixel
is a miss of its ground-truth class and a prediction of no class (as mmseg counts out-of-range predictions).
Results are fractions in [0, 1] (undefined values are NaN, written to JSON files as null: ``data.json_io``);
``format_table`` prints percentages.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SemanticEvaluator", "confusion_matrix"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """int64 [K, K] matrix, rows = ground truth class, columns = predicted class; ignored pixels skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    valid = target != ignore_index
    target, pred = target[valid], pred[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"target contains class id {bad} outside [0, {num_classes}) and != ignore {ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        bad = pred[(pred < 0) | (pred >= num_classes)][0].item()
        raise ValueError(f"prediction contains class id {bad} outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


class SemanticEvaluator:
    """Accumulates a confusion matrix over images; ``compute()`` gives mIoU, per-class IoU and accuracies."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    @classmethod
    def from_label_space(cls, label_space: Any) -> "SemanticEvaluator":
        return cls(len(label_space.names), getattr(label_space, "ignore_index", 255), label_space.names)

    def reset(self) -> None:
        self.matrix = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
        self.missed = torch.zeros(self.num_classes, dtype=torch.int64)  # per ground-truth class: predicted -1
        self.num_images = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one image ([H, W]) or a batch ([B, H, W]) of predicted class ids (or -1, no class) against the
        target."""
        images = 1 if pred.dim() <= 2 else pred.shape[0]
        unscored = pred < 0
        if unscored.any():
            if pred.shape != target.shape:
                raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
            if (pred < -1).any():
                raise ValueError(f"prediction contains class id {int(pred.min())} outside [0, {self.num_classes})")
            target = target.to(pred.device)
            missed = target[unscored & (target != self.ignore_index)].long()
            if missed.numel() and (int(missed.min()) < 0 or int(missed.max()) >= self.num_classes):
                raise ValueError(f"target contains a class id outside [0, {self.num_classes}) and != ignore "
                                 f"{self.ignore_index}")
            self.missed += torch.bincount(missed, minlength=self.num_classes).cpu()
            pred, target = pred[~unscored], target[~unscored]
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.num_images += images

    def merge(self, other: "SemanticEvaluator") -> None:
        """Add another evaluator's counts (e.g. gathered from another process)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge evaluators with {other.num_classes} and {self.num_classes} classes")
        self.matrix += other.matrix
        self.missed += other.missed
        self.num_images += other.num_images

    def compute(self) -> dict[str, Any]:
        matrix = self.matrix.double().numpy()
        true_positive = np.diag(matrix)
        missed = self.missed.double().numpy()
        gt_pixels = matrix.sum(1) + missed
        pred_pixels = matrix.sum(0)
        union = gt_pixels + pred_pixels - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
            accuracy = np.where(gt_pixels > 0, true_positive / gt_pixels, np.nan)
        total = matrix.sum() + missed.sum()
        frequency = gt_pixels / total if total > 0 else np.zeros_like(gt_pixels)
        valid_iou = ~np.isnan(iou)
        return {
            "mIoU": float(iou[valid_iou].mean()) if valid_iou.any() else math.nan,
            "fwIoU": float((frequency[valid_iou] * iou[valid_iou]).sum()) if valid_iou.any() else math.nan,
            "mACC": float(np.nanmean(accuracy)) if (gt_pixels > 0).any() else math.nan,
            "pACC": float(true_positive.sum() / total) if total > 0 else math.nan,
            "num_images": self.num_images,
            "per_class": {
                name: {"IoU": float(iou[c]), "ACC": float(accuracy[c]), "gt_pixels": int(gt_pixels[c])}
                for c, name in enumerate(self.class_names)
            },
        }

    def summary(self) -> dict[str, float]:
        """Flat percentages for logging: mIoU, fwIoU, mACC, pACC."""
        results = self.compute()
        return {key: 100.0 * results[key] for key in ("mIoU", "fwIoU", "mACC", "pACC")}

    def format_table(self, results: dict[str, Any] | None = None) -> str:
        results = results if results is not None else self.compute()
        width = max([5] + [len(name) for name in self.class_names])
        lines = [f"{'class':<{width}} | {'IoU':>6} | {'ACC':>6}", "-" * (width + 19)]
        for name, row in results["per_class"].items():
            lines.append(f"{name:<{width}} | {_pct(row['IoU'])} | {_pct(row['ACC'])}")
        lines.append("-" * (width + 19))
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            lines.append(f"{key:<{width}} | {_pct(results[key])}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'nan':>6}" if math.isnan(value) else f"{100.0 * value:6.2f}"
