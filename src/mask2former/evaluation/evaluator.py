"""Run a model over a data set and compute PQ / AP / mIoU in one pass (one forward per batch, all tasks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TASKS, Config
from ..data.json_io import dumps
from ..data.label_space import LabelSpace
from .instance import InstanceEvaluator
from .panoptic import PanopticEvaluator
from .results_files import ResultsWriter, SavedPredictions, file_stem
from .semantic import SemanticEvaluator


def evaluate_model(
    model, dataset, label_space: LabelSpace, tasks: Sequence[str] = TASKS, batch_size: int = 4, device: str = "cpu",
    min_size: int | None = None, max_size: int | None = None, precision: str = "fp32",
    object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, top_k: int = 100,
    save_predictions: str | Path | None = None, semantic_postprocess_before_inference: bool | None = None,
) -> dict[str, Any]:
    """``dataset`` yields sample dicts (``data.contracts.Sample``) at their original size. Returns
    ``{"metrics": flat dict, "details": per-task results, "table": printable text, "seconds": ...}``.
    ``save_predictions``: a folder for the standard results files of every evaluated task (see ``results_files``).
    ``semantic_postprocess_before_inference``: see ``Predictor`` (None = the model's)."""
    from ..inference.predictor import Predictor

    _check_tasks(tasks)
    was_training = model.training
    predictor = Predictor(
        model, task=tasks[0], device=device, min_size=min_size, max_size=max_size, batch_size=batch_size,
        precision=precision, label_space=label_space, object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold, top_k=top_k,
        semantic_postprocess_before_inference=semantic_postprocess_before_inference,
    )
    evaluators = _make_evaluators(tasks, label_space, top_k)
    writer = ResultsWriter(save_predictions, label_space, tuple(evaluators)) if save_predictions else None
    start = time.perf_counter()
    batch: list[dict[str, Any]] = []
    indices = range(len(dataset))
    for position, index in enumerate(indices):
        batch.append(dataset[index])
        if len(batch) == batch_size or position == len(indices) - 1:
            results = predictor.predict_tasks([sample["image"] for sample in batch], tuple(evaluators))
            for sample, result in zip(batch, results):
                _update(evaluators, sample, result, label_space)
                if writer is not None:
                    writer.add(sample["image_id"], file_stem(sample["image_id"], sample.get("file_name")), result)
            batch = []
    seconds = time.perf_counter() - start
    model.train(was_training)
    if writer is not None:
        writer.close()
    return _finish(evaluators, seconds, len(dataset))


def _check_tasks(tasks: Sequence[str]) -> None:
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown evaluation task {unknown[0]!r} (choose from {', '.join(TASKS)})")


def _make_evaluators(tasks: Sequence[str], label_space: LabelSpace, top_k: int) -> dict[str, Any]:
    evaluators: dict[str, Any] = {}
    if "panoptic" in tasks:
        evaluators["panoptic"] = PanopticEvaluator.from_label_space(label_space)
    if "instance" in tasks:
        evaluators["instance"] = InstanceEvaluator.from_label_space(label_space, max_detections=top_k)
    if "semantic" in tasks:
        evaluators["semantic"] = SemanticEvaluator.from_label_space(label_space)
    return evaluators


def _finish(evaluators: dict[str, Any], seconds: float, num_images: int) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    tables = []
    for task, evaluator in evaluators.items():
        details[task] = evaluator.compute()
        metrics.update(evaluator.summary())
        tables.append(evaluator.format_table(details[task]))
    return {"metrics": metrics, "details": details, "table": "\n\n".join(tables), "seconds": seconds,
            "num_images": num_images}


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


def evaluate_checkpoint(checkpoint: str, config: Config, tasks: Sequence[str] = TASKS, device: str = "cpu",
                        out: str | None = None, precision: str = "fp32",
                        save_predictions: str | None = None) -> dict[str, Any]:
    """``mask2former evaluate``: the checkpoint on the validation split that ``config.data`` describes, at
    ``precision`` (fp32 by default, as ``predict``: detectron2 evaluates without autocast too)."""
    from ..data.build import build_dataset
    from ..modeling.model import Mask2Former

    model = Mask2Former.from_pretrained(checkpoint)
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    if model.labels is not None and LabelSpace.from_dict(model.labels) != label_space:
        raise ValueError(f"checkpoint {checkpoint} was trained on other classes than the data set {config.data.dataset}")
    if model.num_classes != label_space.num_classes:
        raise ValueError(f"checkpoint {checkpoint} predicts {model.num_classes} classes, the data set has {label_space.num_classes}")
    result = evaluate_model(model, dataset, label_space, tasks, device=device, precision=precision,
                            save_predictions=save_predictions, **config.test.predictor_options())
    _write_metrics(result, out)
    return result


def evaluate_predictions(directory: str, config: Config, tasks: Sequence[str] = TASKS,
                         out: str | None = None) -> dict[str, Any]:
    """``mask2former evaluate --predictions DIR``: score saved standard results files (ours or any other
    system's) against the validation split of ``config.data``, without a model. Evaluates the requested tasks
    whose files are present in ``directory``."""
    from ..data.build import build_dataset

    _check_tasks(tasks)
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    ids = _dataset_image_ids(dataset)
    saved = SavedPredictions(directory, label_space, ids)
    present = [task for task in tasks if task in saved.tasks()]
    if not present:
        raise FileNotFoundError(f"{directory} holds no results files for {', '.join(tasks)} (expected "
                                f"panoptic.json + panoptic/, instances.json or semantic/)")
    evaluators = _make_evaluators(present, label_space, config.test.top_k)
    start = time.perf_counter()
    for index in range(len(dataset)):
        sample = dataset[index]
        size = tuple(int(v) for v in sample["image"].shape[-2:])
        result = saved.result(sample["image_id"], file_stem(sample["image_id"], sample.get("file_name")), size)
        _update(evaluators, sample, result, label_space)
    result = _finish(evaluators, time.perf_counter() - start, len(dataset))
    _write_metrics(result, out)
    return result


def _dataset_image_ids(dataset) -> list[Any]:
    """Image ids without decoding images where the reader lists them (COCO readers); else from the samples."""
    if hasattr(dataset, "entries"):
        return [annotation["image_id"] for _, annotation in dataset.entries]
    if hasattr(dataset, "images") and isinstance(dataset.images, list):
        return [info["id"] for info in dataset.images]
    if type(dataset).__name__ in ("FolderDataset", "ADE20KDataset"):
        return [image_path.stem for image_path, _ in dataset.pairs]
    return [dataset[index]["image_id"] for index in range(len(dataset))]


def _write_metrics(result: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        # Undefined metrics (NaN: no ground truth of a kind) are null, as in metrics.jsonl (data.json_io).
        Path(out).write_text(dumps({"metrics": result["metrics"], "details": _jsonable(result["details"]),
                                    "num_images": result["num_images"], "seconds": result["seconds"]}, indent=1))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
