"""Run a model over a data set and compute PQ / AP / mIoU in one pass (one forward per batch, all tasks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TASKS, Config
from ..data.image_io import one_line
from ..data.json_io import dumps
from ..data.label_space import LabelSpace
from ..training.distributed import shard_range
from . import sharding
from .instance import InstanceEvaluator
from .label_subset import LabelSubset
from .panoptic import PanopticEvaluator
from .results_files import ResultsWriter, SavedPredictions, file_stem, remove_results_files
from .semantic import SemanticEvaluator


def evaluate_model(
    model, dataset, label_space: LabelSpace, tasks: Sequence[str] = TASKS, batch_size: int = 4, device: str = "cpu",
    min_size: int | None = None, max_size: int | None = None, precision: str = "fp32",
    object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, top_k: int = 100,
    save_predictions: str | Path | None = None, semantic_postprocess_before_inference: bool | None = None,
    label_subset: LabelSubset | None = None,
) -> dict[str, Any]:
    """``dataset`` yields sample dicts (``data.contracts.Sample``) at their original size. Returns
    ``{"metrics": flat dict, "details": per-task results, "table": printable text, "seconds": ...}``.
    ``save_predictions``: a folder for the standard results files of every evaluated task (see ``results_files``).
    ``semantic_postprocess_before_inference``: see ``Predictor`` (None = the model's).
    ``label_subset``: the model predicts in ``label_subset.model`` and its results are restated in ``label_space``
    (= ``label_subset.data``), a subset of its classes (see ``label_subset.py``)."""
    from ..inference.predictor import Predictor

    _check_tasks(tasks)
    was_training = model.training
    predictor = Predictor(
        model, task=tasks[0], device=device, min_size=min_size, max_size=max_size, batch_size=batch_size,
        precision=precision, label_space=label_subset.model if label_subset else label_space,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold, top_k=top_k,
        semantic_postprocess_before_inference=semantic_postprocess_before_inference,
    )
    evaluators = _make_evaluators(tasks, label_space, top_k)
    # Under a process group (torchrun) each process takes a contiguous shard of whole batches (see sharding.py).
    rank, world = sharding.process_group()
    indices = shard_range(len(dataset), rank, world, batch_size)
    sharding.warn_idle(len(dataset), -(-len(dataset) // batch_size), world, "evaluate")
    if save_predictions and rank == 0:
        remove_results_files(save_predictions)  # an earlier run's JSON must not look like this run's
    writer = ResultsWriter(save_predictions, label_space, tuple(evaluators)) if save_predictions else None
    start = time.perf_counter()
    error = None
    try:
        _run_batches(predictor, dataset, indices, batch_size, evaluators, label_space, writer, label_subset)
    except Exception as failure:  # noqa: BLE001 - in a group, the other processes must hear of it (below)
        if world == 1:
            raise
        error = one_line(failure)
    finally:
        model.train(was_training)
    if world > 1:
        sharding.check_no_failure(error, "evaluate")
        parts = sharding.gather_to_main((evaluators, writer.state() if writer else None), "evaluate")
        if rank == 0:
            evaluators = _merge_parts(parts, writer)

    def finish() -> dict[str, Any]:
        if writer is not None:
            writer.close()
        return _finish(evaluators, time.perf_counter() - start, len(dataset))

    return sharding.share_result(finish, "evaluate")


def _run_batches(predictor, dataset, indices: range, batch_size: int, evaluators: dict[str, Any],
                 label_space: LabelSpace, writer: ResultsWriter | None, label_subset: LabelSubset | None) -> None:
    """Forward, match and (optionally) write the images ``indices`` of ``dataset``, ``batch_size`` at a time."""
    batch: list[dict[str, Any]] = []
    for position, index in enumerate(indices):
        batch.append(dataset[index])
        if len(batch) == batch_size or position == len(indices) - 1:
            results = predictor.predict_tasks([sample["image"] for sample in batch], tuple(evaluators))
            for sample, result in zip(batch, results):
                result = label_subset(result) if label_subset else result
                _update(evaluators, sample, result, label_space)
                if writer is not None:
                    writer.add(sample["image_id"], file_stem(sample["image_id"], sample.get("file_name")), result)
            batch = []


def _merge_parts(parts: list[Any], writer: ResultsWriter | None) -> dict[str, Any]:
    """Rank 0: the evaluators (and results entries) of every process merged in rank order = data set order."""
    merged, _ = parts[0]
    for evaluators, state in parts[1:]:
        for task, evaluator in merged.items():
            evaluator.merge(evaluators[task])
        if writer is not None:
            writer.merge(state)
    return merged


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


def evaluate_checkpoint(checkpoint: Any, config: Config, tasks: Sequence[str] = TASKS, device: str = "cpu",
                        out: str | None = None, precision: str = "fp32",
                        save_predictions: str | None = None) -> dict[str, Any]:
    """``mask2former evaluate``: the checkpoint on the validation split that ``config.data`` describes, at
    ``precision`` (fp32 by default, as ``predict``: detectron2 evaluates without autocast too). ``checkpoint`` may
    also be a loaded exported model (``inference.runtimes``), which runs at the precision it was loaded with.

    Under ``torchrun`` every process evaluates its shard of the data (``device="cuda"`` = ``cuda:LOCAL_RANK``),
    rank 0 merges and writes ``out``; every process returns the same result."""
    from ..training.distributed import cleanup, init_distributed

    context = init_distributed(device)
    try:
        return _evaluate_checkpoint(checkpoint, config, tasks, str(context.device), out if context.is_main else None,
                                    precision, save_predictions)
    finally:
        cleanup(context)


def _evaluate_checkpoint(checkpoint: Any, config: Config, tasks: Sequence[str], device: str, out: str | None,
                         precision: str, save_predictions: str | None) -> dict[str, Any]:
    from ..data.build import build_dataset
    from ..modeling.model import Mask2Former

    if isinstance(checkpoint, (str, Path)):
        model = Mask2Former.from_pretrained(checkpoint)
    elif getattr(checkpoint, "runtime", None):  # an exported model on its runtime: no autocast around it
        model, checkpoint, precision = checkpoint, checkpoint.path, "fp32"
    else:
        model, checkpoint = checkpoint, type(checkpoint).__name__
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    subset = None
    if model.labels is not None:
        # The data set may have a subset of the model's classes (a panoptic model on its instance JSON).
        subset = LabelSubset(LabelSpace.from_dict(model.labels), label_space,
                             f"checkpoint {checkpoint} on data set {config.data.dataset}")
        subset = None if subset.is_identity else subset
    elif model.num_classes != label_space.num_classes:
        raise ValueError(f"checkpoint {checkpoint} predicts {model.num_classes} classes, the data set has {label_space.num_classes}")
    result = evaluate_model(model, dataset, label_space, tasks, device=device, precision=precision,
                            save_predictions=save_predictions, label_subset=subset, **config.test.predictor_options())
    if subset is not None:
        unscored = subset.unscored_names
        result["unscored_classes"] = unscored
        result["table"] = (f"scored on the data set's {label_space.num_classes} of the model's "
                           f"{subset.model.num_classes} classes; predictions of the other {len(unscored)} "
                           f"({', '.join(unscored[:6])}{', ...' if len(unscored) > 6 else ''}) are not scored as any "
                           f"class\n\n" + result["table"])
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
                                    "num_images": result["num_images"], "seconds": result["seconds"],
                                    **({"unscored_classes": result["unscored_classes"]}
                                       if "unscored_classes" in result else {})}, indent=1))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
