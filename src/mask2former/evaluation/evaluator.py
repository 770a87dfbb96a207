"""Run a model over a data set and compute PQ / AP / mIoU in one pass (one forward per batch, all tasks)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.label_space import LabelSpace
from .instance import InstanceEvaluator
from .panoptic import PanopticEvaluator
from .semantic import SemanticEvaluator

TASKS = ("panoptic", "instance", "semantic")


def evaluate_model(
    model, dataset, label_space: LabelSpace, tasks: Sequence[str] = TASKS, batch_size: int = 4, device: str = "cpu",
    min_size: int | None = None, max_size: int | None = None, precision: str = "fp32",
    object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, top_k: int = 100,
) -> dict[str, Any]:
    """``dataset`` yields sample dicts (INTERFACES.md) at their original size. Returns ``{"metrics": flat dict,
    "details": per-task results, "table": printable text, "seconds": ...}``."""
    from ..inference.predictor import Predictor

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown evaluation task {unknown[0]!r} (choose from {', '.join(TASKS)})")
    was_training = model.training
    predictor = Predictor(
        model, task=tasks[0], device=device, min_size=min_size, max_size=max_size, batch_size=batch_size,
        precision=precision, label_space=label_space, object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold, top_k=top_k,
    )
    evaluators: dict[str, Any] = {}
    if "panoptic" in tasks:
        evaluators["panoptic"] = PanopticEvaluator.from_label_space(label_space)
    if "instance" in tasks:
        evaluators["instance"] = InstanceEvaluator.from_label_space(label_space, max_detections=top_k)
    if "semantic" in tasks:
        evaluators["semantic"] = SemanticEvaluator.from_label_space(label_space)
    start = time.perf_counter()
    batch: list[dict[str, Any]] = []
    indices = range(len(dataset))
    for position, index in enumerate(indices):
        batch.append(dataset[index])
        if len(batch) == batch_size or position == len(indices) - 1:
            results = predictor.predict_tasks([sample["image"] for sample in batch], tuple(evaluators))
            for sample, result in zip(batch, results):
                _update(evaluators, sample, result, label_space)
            batch = []
    seconds = time.perf_counter() - start
    model.train(was_training)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    tables = []
    for task, evaluator in evaluators.items():
        details[task] = evaluator.compute()
        metrics.update(evaluator.summary())
        tables.append(evaluator.format_table(details[task]))
    return {"metrics": metrics, "details": details, "table": "\n\n".join(tables), "seconds": seconds,
            "num_images": len(dataset)}


def _update(evaluators: dict[str, Any], sample: dict[str, Any], result: dict[str, Any], label_space: LabelSpace) -> None:
    if "panoptic" in evaluators:
        evaluators["panoptic"].update_from_sample(result["panoptic"], sample)
    if "instance" in evaluators:
        # Instance AP is over thing classes; stuff segments are not ground-truth instances.
        is_thing = label_space.is_thing_tensor()[sample["labels"]] if len(sample["labels"]) else torch.zeros(0, dtype=torch.bool)
        target = {"labels": sample["labels"][is_thing], "masks": sample["masks"][is_thing],
                  "iscrowd": sample["iscrowd"][is_thing], "image_id": sample.get("image_id")}
        evaluators["instance"].update(result["instance"], target)
    if "semantic" in evaluators:
        evaluators["semantic"].update(result["semantic"], sample["semantic"])


def evaluate_checkpoint(checkpoint: str, config, tasks: Sequence[str] = TASKS, device: str = "cpu",
                        out: str | None = None) -> dict[str, Any]:
    """``mask2former evaluate``: the checkpoint on the validation split that ``config.data`` describes."""
    from ..modeling.model import Mask2Former
    from ..train import build_dataset

    model = Mask2Former.from_pretrained(checkpoint)
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    if model.labels is not None and LabelSpace.from_dict(model.labels) != label_space:
        raise ValueError(f"checkpoint {checkpoint} was trained on other classes than the data set {config.data.dataset}")
    if model.num_classes != label_space.num_classes:
        raise ValueError(f"checkpoint {checkpoint} predicts {model.num_classes} classes, the data set has {label_space.num_classes}")
    result = evaluate_model(
        model, dataset, label_space, tasks, device=device, min_size=config.test.min_size or None,
        max_size=config.test.max_size or None, precision=config.solver.precision,
        object_mask_threshold=config.test.object_mask_threshold, overlap_threshold=config.test.overlap_threshold,
        top_k=config.test.top_k,
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"metrics": result["metrics"], "details": _jsonable(result["details"]),
                                         "num_images": result["num_images"], "seconds": result["seconds"]}, indent=1))
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
