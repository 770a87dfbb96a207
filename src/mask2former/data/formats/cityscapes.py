"""Cityscapes (gtFine) as a Dataset, in the 19 train classes with 255 = ignore.

Targets:
- ``"semantic"``: from ``*_gtFine_labelIds.png`` (label id -> trainId) or ``*_gtFine_labelTrainIds.png``
  (``label_type="trainIds"``); one mask per present train class.
- ``"panoptic"``: from ``*_gtFine_instanceIds.png`` alone (as cityscapesScripts' createPanopticImgs does): values
  >= 1000 are ``labelId * 1000 + index`` instances of thing classes; values < 1000 are a ``labelId``, one segment per
  class, marked ``iscrowd`` for thing classes (group/crowd regions). Classes ignored in evaluation (trainId 255,
  caravan and trailer included) become ignore pixels and produce no segment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..image_io import read_image, read_label_png
from ..label_space import LabelSpace, builtin_label_space
from ._common import Transforms, apply_transforms, check_same_size, make_sample, map_raw_labels, masks_from_semantic


IGNORE = 255
NUM_LABEL_IDS = 34  # official label ids 0..33 (the -1 "license plate" never appears in label images)


def cityscapes_label_space() -> LabelSpace:
    """The 19 train classes (contiguous id = trainId); dataset ids are the official label ids. The built-in table
    (``builtin_label_space("cityscapes")``): every other label id 0..33 is ignored in training and evaluation."""
    return builtin_label_space("cityscapes")


def label_id_to_train_id_table() -> np.ndarray:
    """int64[34]: official label id -> trainId (255 for classes ignored in evaluation)."""
    table = cityscapes_label_space().lookup_table(NUM_LABEL_IDS)
    return np.where(table >= 0, table, IGNORE)


class CityscapesDataset(Dataset):
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``root/gtFine/<split>/<city>/*_gtFine_*.png``.

    Args:
        root: the Cityscapes root.
        split: ``"train"``, ``"val"`` or ``"test"``.
        target: ``"semantic"`` or ``"panoptic"`` (see the module docstring).
        label_type: for ``target="semantic"``: ``"labelIds"`` or ``"trainIds"``.
        transforms: callable applied to each sample dict.
    """

    def __init__(self, root: str | Path, split: str = "train", target: str = "panoptic",
                 label_type: str = "labelIds", transforms: Transforms = None) -> None:
        if target not in ("semantic", "panoptic"):
            raise ValueError(f"CityscapesDataset: target must be 'semantic' or 'panoptic', got {target!r}")
        if label_type not in ("labelIds", "trainIds"):
            raise ValueError(f"CityscapesDataset: label_type must be 'labelIds' or 'trainIds', got {label_type!r}")
        self.root = Path(root)
        self.split = split
        self.target = target
        self.label_type = label_type
        self.transforms = transforms
        self.label_space = cityscapes_label_space()
        self._label_table = label_id_to_train_id_table()
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes image folder not found: {image_dir}")
        suffix = {"panoptic": "instanceIds", "semantic": "labelIds" if label_type == "labelIds" else "labelTrainIds"}
        self.pairs: list[tuple[Path, Path]] = []
        for image_path in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = image_path.name[: -len("_leftImg8bit.png")]
            label_path = self.root / "gtFine" / split / image_path.parent.name / f"{stem}_gtFine_{suffix[target]}.png"
            if not label_path.is_file():
                raise FileNotFoundError(f"no label {label_path} for image {image_path}")
            self.pairs.append((image_path, label_path))
        if not self.pairs:
            raise ValueError(f"no *_leftImg8bit.png images found under {image_dir}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _map_label_ids(self, label_ids: np.ndarray, path: Path) -> np.ndarray:
        return map_raw_labels(label_ids, self._label_table, IGNORE, path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label_png(label_path)
        check_same_size(image, raw.shape, image_path, label_path)
        image_id = image_path.name[: -len("_leftImg8bit.png")]
        if self.target == "semantic":
            if self.label_type == "labelIds":
                semantic = self._map_label_ids(raw, label_path)
            else:
                valid = np.arange(self.label_space.num_classes, dtype=np.int64)
                semantic = map_raw_labels(raw, valid, IGNORE, label_path, ignore_values=(IGNORE,))
            labels, masks = masks_from_semantic(semantic, IGNORE)
            iscrowd = np.zeros(len(labels), dtype=bool)
        else:
            labels, masks, iscrowd, semantic = self._panoptic(raw.astype(np.int64), label_path)
        sample = make_sample(image, labels, masks, iscrowd, semantic, image_id, str(image_path))
        return apply_transforms(sample, self.transforms)

    def _panoptic(self, instance_ids: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        label_ids = np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids)
        semantic = self._map_label_ids(label_ids, path)
        labels, masks, iscrowd = [], [], []
        for value in np.unique(instance_ids).tolist():
            label_id = value // 1000 if value >= 1000 else value
            train_id = int(self._label_table[label_id])
            if train_id == IGNORE:
                continue
            is_thing_label = self.label_space.is_thing[train_id]
            if value >= 1000 and not is_thing_label:
                raise ValueError(f"instance label {path} has instance value {value} for stuff class "
                                 f"{self.label_space.names[train_id]!r} (label id {label_id})")
            labels.append(train_id)
            masks.append(instance_ids == value)
            iscrowd.append(is_thing_label and value < 1000)
        height, width = instance_ids.shape
        masks_array = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return np.array(labels, dtype=np.int64), masks_array, np.array(iscrowd, dtype=bool), semantic
