"""``mask2former train``: data sets, model, criterion and trainer from a :class:`Config`, then ``Trainer.fit``.

Single process: ``mask2former train --config fashion_scenes_lite0``. Several (one per GPU, or CPU processes with
gloo): ``torchrun --nproc_per_node N -m mask2former train ...``; ``solver.batch_size`` stays the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from ..config import TASKS, Config
from ..data.build import build_datasets
from ..modeling.build import build_model, check_backbone_weights
from ..training.build import build_criterion

logger = logging.getLogger("mask2former.train")


def build_evaluate_fn(config: Config, label_space: Any) -> Callable[[nn.Module, Any], dict] | None:
    """PQ/AP/mIoU for a panoptic ``test.task`` (as the reference reports on COCO), else that task's metric."""
    try:
        from ..evaluation.evaluator import evaluate_model
    except ImportError:  # evaluation not available: train without it
        return None
    tasks = TASKS if config.test.task == "panoptic" else (config.test.task,)

    def evaluate(model: nn.Module, dataset: Any) -> dict:
        device = next(model.parameters()).device
        # fp32 like `mask2former evaluate`/`predict` and detectron2's test loop, whatever the training precision
        return evaluate_model(model, dataset, label_space, tasks, device=str(device), precision="fp32",
                              **config.test.predictor_options())

    return evaluate


def run_train(config: Config, resume: bool = False, explicit_model_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Build everything from ``config`` and train (or continue, ``resume=True``). Returns ``Trainer.fit``'s dict.

    ``model.weights`` (fine-tuning) starts from a whole trained model (``modeling/finetune.py``); ``--resume``
    wins over it. ``explicit_model_keys``: the ``model.*`` keys the user set explicitly (command-line overrides),
    which win over the checkpoint's architecture."""
    from ..training import distributed as dist_utils
    from ..training.time_budget import TimeBudget
    from ..training.trainer import Trainer, seed_everything

    started = time.perf_counter()

    if not config.model.weights:
        check_backbone_weights(config)
    train_dataset, val_dataset, label_space = build_datasets(config)
    if config.model.num_classes != label_space.num_classes:
        logger.info("model.num_classes %d -> %d (the classes of %s)", config.model.num_classes,
                    label_space.num_classes, config.data.dataset)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, num_classes=label_space.num_classes,
                                          mask_piloting=config.model.mask_piloting or config.mask_piloting.enabled),
        labels=label_space.to_dict())
    seed_everything(config.train.seed)
    weights_report = ""
    if config.model.weights:
        model, config, weights_report = _model_from_weights(config, label_space, resume, explicit_model_keys)
    else:
        model = build_model(config, label_space)
    criterion = build_criterion(config, label_space.num_classes)
    evaluate_fn = build_evaluate_fn(config, label_space) if val_dataset is not None else None
    budget = config.solver.time_budget_minutes
    if budget < 0:
        raise ValueError(f"solver.time_budget_minutes must be >= 0, got {budget}")
    # On --resume the run's config.yaml already holds the max_iter the budget chose.
    callbacks = [TimeBudget(budget, started)] if budget > 0 and not resume else []
    trainer = Trainer(config, model, train_dataset, val_dataset, label_space, criterion=criterion,
                      evaluate_fn=evaluate_fn, callbacks=callbacks)
    if trainer.is_main:  # where the backbone's weights came from (or that it starts random)
        print(weights_report or getattr(model.backbone, "weights_report", ""), flush=True)
        if getattr(trainer, "freeze_report", None):
            print("\n".join(trainer.freeze_report), flush=True)
    try:
        result = trainer.fit(resume=resume)
        if trainer.is_main:
            _report(config, trainer, result, val_dataset, label_space)
        return result
    finally:
        dist_utils.cleanup(trainer.context)


def _model_from_weights(config: Config, label_space: Any, resume: bool, explicit_model_keys: Iterable[str]
                        ) -> tuple[nn.Module, Config, str]:
    """The model of a ``model.weights`` run and the config with its architecture. Resuming a run that has a
    checkpoint builds the run's own saved architecture and leaves the weights to the checkpoint (resume wins)."""
    from ..config import load_config
    from ..modeling.backbone import skip_imagenet_weights
    from ..modeling.finetune import model_from_weights
    from ..training.resume import find_last_checkpoint

    output_dir = Path(config.train.output_dir)
    model_config = _run_model_config(config)
    if resume and find_last_checkpoint(output_dir) is not None and (output_dir / "config.yaml").exists():
        saved = load_config(output_dir / "config.yaml").model  # its model.weights: the run's first start
        with skip_imagenet_weights():
            model = build_model(dataclasses.replace(config, model=saved), label_space)
        report = (f"model.weights={config.model.weights} not loaded: resuming the run in {output_dir} "
                  f"(--resume wins over model.weights)")
    else:
        model, report = model_from_weights(model_config, label_space.to_dict(), explicit_model_keys)
    return model, dataclasses.replace(config, model=model.config), report


def _run_model_config(config: Config) -> Any:
    """``config.model`` with what ``build_model`` derives from the rest of the config (piloting, test flag)."""
    return dataclasses.replace(
        config.model, mask_piloting=config.model.mask_piloting or config.mask_piloting.enabled,
        semantic_postprocess_before_inference=config.test.semantic_before_inference())


def _report(config: Config, trainer: Any, result: dict[str, Any], val_dataset: Any, label_space: Any) -> None:
    """Curves and overlays next to the checkpoints, and a summary of where everything is."""
    from ..training.distributed import unwrap
    from ..training.report import plot_curves, write_overlays

    output_dir = Path(result["output_dir"])
    curves = plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    overlays: list[Path] = []
    if val_dataset is not None:
        overlays = write_overlays(unwrap(trainer.model), val_dataset, label_space, output_dir / "overlays",
                                  config.test, precision="fp32")
    lines = [f"finished {result['step']} iterations; outputs in {output_dir}:"]
    lines.append(f"  model (from_pretrained / --checkpoint): {result['final_model']}")
    lines.append(f"  resumable checkpoint: {result['checkpoint']}")
    lines.append(f"  metrics log: {output_dir / 'metrics.jsonl'}")
    lines.append(f"  loss and metric curves: {curves}")
    if overlays:
        lines.append(f"  prediction overlays (ground truth | prediction): {overlays[0].parent}/ ({len(overlays)} images)")
    summary = result.get("metrics") or {}
    if summary:
        shown = ", ".join(f"{key} {summary[key]:.1f}" for key in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU") if key in summary)
        lines.append(f"  validation ({len(val_dataset)} images): {shown}")
    print("\n".join(lines), flush=True)

