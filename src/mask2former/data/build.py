"""Data sets and training transforms from a :class:`~mask2former.config.Config` (``data`` and ``test.task``)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from ..config import Config, DataConfig
from .contracts import Transform
from .label_space import LabelSpace, builtin_label_space

DATASETS = ("fashion_scenes", "coco", "coco_panoptic", "ade20k", "cityscapes", "folder", "labelme", "yolo", "voc")
# config.data.dataset -> the built-in label space its files use.
DATASET_LABEL_SPACES = {"coco_panoptic": "coco_panoptic", "coco": "coco_instance", "ade20k": "ade20k",
                        "cityscapes": "cityscapes"}


def build_train_transforms(data: DataConfig, task: str = "panoptic") -> Transform | None:
    """The ``data.augmentation`` recipe, as Mask2Former's data set mappers: ``lsj`` (COCO,
    :func:`~mask2former.data.transforms.lsj_train_transforms`), ``semantic`` (ADE20K/Cityscapes,
    :func:`~mask2former.data.transforms.semantic_train_transforms`; ADE20K pads to the crop size), ``crop`` (a random
    ``crop_size`` window at the original scale: cheaper steps on the same objects) or ``none``.

    ``task`` (``test.task``) picks the mapper's label handling: panoptic targets keep segments a crop emptied and are
    resized with PIL nearest; instance targets drop them; semantic targets drop them and the semantic map is resized
    with torch nearest (the reference resizes the float semantic map with ``F.interpolate``)."""
    from . import transforms as T

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
        from .fashion_scenes import FashionScenes

        dataset = FashionScenes(split=split, num_images=data.num_train_images if train else data.num_val_images,
                                seed=data.seed, image_size=data.image_size, transforms=transforms)
        return dataset, dataset.label_space
    if not data.root:
        raise ValueError(f"data.root is empty: set it to the {data.dataset} folder (data.root=PATH)")
    root = Path(data.root)
    if data.dataset == "coco":
        from .formats import CocoInstanceDataset
        from .formats.coco_layouts import find_coco_layout

        annotations, images = data.extra.get(f"{role}_annotations"), data.extra.get(f"{role}_images")
        if annotations is None:  # detectron2's, Roboflow's or CVAT's layout
            annotations, found_images = find_coco_layout(root, split, single=split == data.train_split)
            images = images or found_images
        elif images is None:
            images = root / split
        dataset = CocoInstanceDataset(annotations, images, transforms=transforms,
                                      drop_parent_categories=Path(annotations).name == "_annotations.coco.json")
    elif data.dataset == "coco_panoptic":
        from .formats import CocoPanopticDataset

        panoptic_root = data.extra.get(f"{role}_panoptic")
        if panoptic_root is None and (root / f"panoptic_{split}").is_dir():
            panoptic_root = root / f"panoptic_{split}"  # detectron2's layout; else the JSON's sibling folder
        dataset = CocoPanopticDataset(
            _extra_path(data, f"{role}_annotations", root / "annotations" / f"panoptic_{split}.json"),
            _extra_path(data, f"{role}_images", root / split), panoptic_root=panoptic_root, transforms=transforms)
    elif data.dataset == "ade20k":
        from .formats import ADE20KDataset

        dataset = ADE20KDataset(root, split=split, transforms=transforms)
    elif data.dataset == "cityscapes":
        from .formats import CityscapesDataset

        target = "semantic" if config.test.task == "semantic" else "panoptic"
        dataset = CityscapesDataset(root, split=split, target=target, transforms=transforms)
    elif data.dataset == "labelme":
        from .formats import LabelmeDataset
        from .formats.labelme import classes_named_in

        folder = root / split
        if not folder.is_dir() and split == data.train_split and any(root.glob("*.json")):
            folder = root  # one folder of JSON files: the single split
        elif not folder.is_dir():
            raise FileNotFoundError(f"labelme: no {split!r} folder under {root}; a single folder of JSON files is "
                                    f"the {data.train_split!r} split, and data.val_fraction holds out validation")
        labels = data.extra.get("labels")
        if labels is None and folder != root and not any((place / name).is_file() for place in (folder, root)
                                                         for name in ("classes.yaml", "labels.txt")):
            labels = classes_named_in(sorted(root.glob("*/*.json")))  # the same classes in every split
        dataset = LabelmeDataset(folder, label_space=labels, transforms=transforms)
    elif data.dataset == "yolo":
        from .formats import YoloDataset

        yaml_path = Path(data.extra["data_yaml"]) if data.extra.get("data_yaml") else root / "data.yaml"
        if not yaml_path.is_file() and not data.extra.get("data_yaml"):
            candidates = sorted(root.glob("*.yaml"))  # Ultralytics names it freely (coco8-seg.yaml, ...)
            yaml_path = candidates[0] if len(candidates) == 1 else yaml_path
        dataset = YoloDataset(yaml_path, split=split, transforms=transforms)
    elif data.dataset == "voc":
        from .formats import VocDataset

        dataset = VocDataset(root, split=split, label_space=data.extra.get("labels"), transforms=transforms,
                             all_without_list=split == data.train_split)  # no lists: everything is training data
    else:
        from .formats import FolderDataset

        dataset = FolderDataset(root, split=split or None, label_space=data.extra.get("labels"),
                                transforms=transforms)
    return dataset, dataset.label_space


def _show_data_log() -> None:
    """The readers' counts and the hold-out line go to ``mask2former.data`` at INFO: show them where the
    application configured no logging (as the trainer does for its own logger)."""
    data_logger = logging.getLogger("mask2former.data")
    if not data_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        data_logger.addHandler(handler)
        data_logger.setLevel(logging.INFO)


def build_datasets(config: Config) -> tuple[Any, Any, Any]:
    """``(train dataset, val dataset or None, label space)``; the val split is skipped when
    ``data.num_val_images == 0`` or ``data.val_split`` is empty. With ``data.val_fraction > 0`` the validation
    images are held out of ``data.train_split`` (:mod:`~mask2former.data.holdout`) and ``data.val_split`` is not
    read."""
    _show_data_log()
    train, label_space = build_dataset(config, config.data.train_split, train=True)
    if config.data.val_fraction > 0:
        from .holdout import hold_out

        if hasattr(train, "transforms"):  # the same files without the training transforms (no second parse)
            unaugmented = copy.copy(train)
            unaugmented.transforms = None
        else:
            unaugmented, _ = build_dataset(config, config.data.train_split, train=False)
        train, val = hold_out(train, unaugmented, config.data.val_fraction, config.data.seed,
                              where=f"({config.data.dataset} {config.data.train_split})")
        return train, val, label_space
    val = None
    if config.data.val_split and not (config.data.dataset == "fashion_scenes" and config.data.num_val_images == 0):
        val, val_labels = build_dataset(config, config.data.val_split, train=False)
        if val_labels != label_space:
            raise ValueError(f"data: the {config.data.val_split} split has other classes than "
                             f"{config.data.train_split}")
    return train, val, label_space


def dataset_label_space(dataset: str) -> LabelSpace | None:
    """The label space a ``data.dataset`` kind implies on its own; None where it comes from the files
    (``folder``) or the kind is unknown."""
    if dataset == "fashion_scenes":
        from .fashion_scenes import fashion_scenes_label_space

        return fashion_scenes_label_space()
    name = DATASET_LABEL_SPACES.get(dataset)
    return builtin_label_space(name) if name is not None else None


def config_label_space(config: Any) -> LabelSpace | None:
    """A :class:`~mask2former.config.Config`'s label space: ``config.labels`` when given, else the one its
    ``data.dataset`` implies (so the ``coco_*``, ``ade20k_*`` and ``cityscapes_*`` presets carry theirs)."""
    if config.labels is not None:
        return LabelSpace.from_dict(config.labels)
    return dataset_label_space(config.data.dataset)


__all__ = ["DATASETS", "DATASET_LABEL_SPACES", "build_dataset", "build_datasets", "build_train_transforms",
           "config_label_space", "dataset_label_space"]
