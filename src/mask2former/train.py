"""``mask2former train``: data sets, model, criterion and trainer from a :class:`Config`, then ``Trainer.fit``.

Single process: ``mask2former train --config fashion_scenes_lite0``. Several (one per GPU, or CPU processes with
gloo): ``torchrun --nproc_per_node N -m mask2former train ...``; ``solver.batch_size`` stays the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .config import Config, DataConfig

logger = logging.getLogger("mask2former.train")

DATASETS = ("fashion_scenes", "coco", "coco_panoptic", "ade20k", "cityscapes", "folder")


def build_train_transforms(data: DataConfig, task: str = "panoptic") -> Callable | None:
    """The ``data.augmentation`` recipe, as Mask2Former's data set mappers: ``lsj`` (COCO: flip + large-scale jitter
    to a square ``crop_size``, padding 128), ``semantic`` (ADE20K/Cityscapes: short side chosen from
    ``int(x * 0.1 * base)``, x from ``min_scale*10`` to ``max_scale*10``, base = the longer crop side, long side at most
    4 x base; ``crop_size`` crop; SSD colour augmentation; flip; ADE20K then pads to the crop size with 128),
    ``crop`` (a random ``crop_size`` window at the original scale: cheaper steps on the same objects) or ``none``.

    ``task`` (``test.task``) picks the mapper's label handling: panoptic targets keep segments a crop emptied and are
    resized with PIL nearest; instance targets drop them; semantic targets drop them and the semantic map is resized
    with torch nearest (the reference resizes the float semantic map with ``F.interpolate``)."""
    from .data import transforms as T

    crop_height, crop_width = data.crop_size
    panoptic = task == "panoptic" and data.dataset != "ade20k"  # ADE20K here is semantic data only
    if data.augmentation == "none":
        return None
    if data.augmentation == "crop":
        return T.RandomCrop((crop_height, crop_width))
    if data.augmentation == "lsj":
        if crop_height != crop_width:
            raise ValueError(f"data.augmentation=lsj needs a square data.crop_size, got {list(data.crop_size)}")
        return T.lsj_train_transforms(crop_height, data.min_scale, data.max_scale, drop_empty=not panoptic)
    if data.augmentation == "semantic":
        return T.semantic_train_transforms(
            (crop_height, crop_width), data.min_scale, data.max_scale, color_aug=True,
            pad_to_crop=data.dataset == "ade20k",  # the reference's INPUT.SIZE_DIVISIBILITY: crop size on ADE20K only
            drop_empty=not panoptic, label_resize="pil" if panoptic else "torch")
    raise ValueError(f"data.augmentation must be lsj, semantic, crop or none, got {data.augmentation!r}")


def _extra_path(data: DataConfig, key: str, default: Path) -> Path:
    value = data.extra.get(key)
    return Path(value) if value else default


def build_dataset(config: Config, split: str, train: bool) -> tuple[Any, Any]:
    """``(dataset, label_space)`` for ``config.data`` and split name ``split``. Paths follow detectron2's layout
    under ``data.root``; ``data.extra`` may override them per split: ``{train,val}_annotations``,
    ``{train,val}_images``, ``{train,val}_panoptic``."""
    data = config.data
    transforms = build_train_transforms(data, config.test.task) if train else None
    role = "train" if train else "val"
    if data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}, got {data.dataset!r}")
    if data.dataset == "fashion_scenes":
        from .data import FashionScenes

        dataset = FashionScenes(split=split, num_images=data.num_train_images if train else data.num_val_images,
                                seed=data.seed, image_size=data.image_size, transforms=transforms)
        return dataset, dataset.label_space
    if not data.root:
        raise ValueError(f"data.root is empty: set it to the {data.dataset} folder (data.root=PATH)")
    root = Path(data.root)
    if data.dataset == "coco":
        from .data import CocoInstanceDataset

        dataset = CocoInstanceDataset(
            _extra_path(data, f"{role}_annotations", root / "annotations" / f"instances_{split}.json"),
            _extra_path(data, f"{role}_images", root / split), transforms=transforms)
    elif data.dataset == "coco_panoptic":
        from .data import CocoPanopticDataset

        panoptic_root = data.extra.get(f"{role}_panoptic")
        if panoptic_root is None and (root / f"panoptic_{split}").is_dir():
            panoptic_root = root / f"panoptic_{split}"  # detectron2's layout; else the JSON's sibling folder
        dataset = CocoPanopticDataset(
            _extra_path(data, f"{role}_annotations", root / "annotations" / f"panoptic_{split}.json"),
            _extra_path(data, f"{role}_images", root / split), panoptic_root=panoptic_root, transforms=transforms)
    elif data.dataset == "ade20k":
        from .data import ADE20KDataset

        dataset = ADE20KDataset(root, split=split, transforms=transforms)
    elif data.dataset == "cityscapes":
        from .data import CityscapesDataset

        target = "semantic" if config.test.task == "semantic" else "panoptic"
        dataset = CityscapesDataset(root, split=split, target=target, transforms=transforms)
    else:
        from .data import FolderDataset

        dataset = FolderDataset(root, split=split or None, label_space=data.extra.get("labels"),
                                transforms=transforms)
    return dataset, dataset.label_space


def build_datasets(config: Config) -> tuple[Any, Any, Any]:
    """``(train dataset, val dataset or None, label space)``; the val split is skipped when
    ``data.num_val_images == 0`` or ``data.val_split`` is empty."""
    train, label_space = build_dataset(config, config.data.train_split, train=True)
    val = None
    if config.data.val_split and not (config.data.dataset == "fashion_scenes" and config.data.num_val_images == 0):
        val, val_labels = build_dataset(config, config.data.val_split, train=False)
        if val_labels != label_space:
            raise ValueError(f"data: the {config.data.val_split} split has other classes than "
                             f"{config.data.train_split}")
    return train, val, label_space


def build_model(config: Config, label_space: Any = None) -> nn.Module:
    """``Mask2Former(config.model)``; the class count comes from ``label_space`` when given."""
    from .modeling.model import Mask2Former

    model_config = config.model
    labels = None
    if label_space is not None:
        labels = label_space.to_dict()
        if model_config.num_classes != label_space.num_classes:
            model_config = dataclasses.replace(model_config, num_classes=label_space.num_classes)
    if config.mask_piloting.enabled and not model_config.mask_piloting:
        # MP-Former's piloting queries need their label embedding (a training-only parameter).
        model_config = dataclasses.replace(model_config, mask_piloting=True)
    # The reference's semantic post-processing order follows the tasks the model is trained for; saved with it.
    model_config = dataclasses.replace(
        model_config, semantic_postprocess_before_inference=config.test.semantic_before_inference()
    )
    return Mask2Former(model_config, labels=labels)


def check_backbone_weights(config: Config) -> None:
    """Refuse to train from a random backbone by accident: a config whose backbone is ``pretrained`` from a
    ``weights`` file (the reference presets) needs that file; ``model.backbone.pretrained=false`` trains without."""
    backbone = config.model.backbone
    if backbone.pretrained and backbone.weights:
        from .interop.backbone_weights import require_weights

        require_weights(backbone.weights)


def build_criterion(config: Config, num_classes: int) -> nn.Module:
    """``SetCriterion`` with the matcher the reference pairs with it (cost weights = loss weights); wrapped in
    MP-Former's ``MaskPilotingCriterion`` when ``mask_piloting.enabled``."""
    from .training.criterion import SetCriterion
    from .training.matcher import HungarianMatcher

    loss = config.loss
    matcher = HungarianMatcher(class_weight=loss.class_weight, mask_weight=loss.mask_weight,
                               dice_weight=loss.dice_weight, num_points=loss.num_points, mask_cost=loss.mask_loss)
    criterion = SetCriterion(
        num_classes, matcher, class_weight=loss.class_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight, num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio,
        deep_supervision=loss.deep_supervision, mask_loss=loss.mask_loss,
    )
    if config.mask_piloting.enabled:
        from .training.mask_piloting import MaskPilotingCriterion

        return MaskPilotingCriterion(criterion, class_loss=config.mask_piloting.class_loss)
    return criterion


def build_evaluate_fn(config: Config, label_space: Any) -> Callable[[nn.Module, Any], dict] | None:
    """PQ/AP/mIoU for a panoptic ``test.task`` (as the reference reports on COCO), else that task's metric."""
    try:
        from .evaluation.evaluator import TASKS, evaluate_model
    except ImportError:  # evaluation not available: train without it
        return None
    tasks = TASKS if config.test.task == "panoptic" else (config.test.task,)

    def evaluate(model: nn.Module, dataset: Any) -> dict:
        device = next(model.parameters()).device
        return evaluate_model(
            model, dataset, label_space, tasks, device=str(device), min_size=config.test.min_size or None,
            # fp32 like `mask2former evaluate`/`predict` and detectron2's test loop, whatever the training precision
            max_size=config.test.max_size or None, precision="fp32",
            object_mask_threshold=config.test.object_mask_threshold, overlap_threshold=config.test.overlap_threshold,
            top_k=config.test.top_k,
        )

    return evaluate


def run_train(config: Config, resume: bool = False) -> dict[str, Any]:
    """Build everything from ``config`` and train (or continue, ``resume=True``). Returns ``Trainer.fit``'s dict."""
    from .training import distributed as dist_utils
    from .training.trainer import Trainer, seed_everything

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
    model = build_model(config, label_space)
    criterion = build_criterion(config, label_space.num_classes)
    evaluate_fn = build_evaluate_fn(config, label_space) if val_dataset is not None else None
    trainer = Trainer(config, model, train_dataset, val_dataset, label_space, criterion=criterion,
                      evaluate_fn=evaluate_fn)
    if trainer.is_main:  # where the backbone's weights came from (or that it starts random)
        print(getattr(model.backbone, "weights_report", ""), flush=True)
    try:
        result = trainer.fit(resume=resume)
        if trainer.is_main:
            _report(config, trainer, result, val_dataset, label_space)
        return result
    finally:
        dist_utils.cleanup(trainer.context)


def _report(config: Config, trainer: Any, result: dict[str, Any], val_dataset: Any, label_space: Any) -> None:
    """Curves and overlays next to the checkpoints, and a summary of where everything is."""
    from .training.distributed import unwrap
    from .training.report import plot_curves, write_overlays

    output_dir = Path(result["output_dir"])
    curves = plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    overlays: list[Path] = []
    if val_dataset is not None:
        overlays = write_overlays(
            unwrap(trainer.model), val_dataset, label_space, output_dir / "overlays", config.test.task,
            precision="fp32", min_size=config.test.min_size or None, max_size=config.test.max_size or None,
        )
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

