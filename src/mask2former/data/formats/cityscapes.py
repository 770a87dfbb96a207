"""Cityscapes (gtFine) as a Dataset, in the 19 train classes with 255 = ignore.

Targets:
- ``"semantic"``: from ``*_gtFine_labelIds.png`` (mapped with ``LABELS``) or ``*_gtFine_labelTrainIds.png``
  (``label_type="trainIds"``); one mask per present train class.
- ``"panoptic"``: from ``*_gtFine_instanceIds.png`` alone (as cityscapesScripts' createPanopticImgs does): values
  >= 1000 are ``labelId * 1000 + index`` instances of thing classes; values < 1000 are a ``labelId``, one segment per
  class, marked ``iscrowd`` for thing classes (group/crowd regions). Classes ignored in evaluation (trainId 255,
  caravan and trailer included) become ignore pixels and produce no segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..image_io import read_image, read_label_png
from ..label_space import LabelSpace
from ._common import Transforms, apply_transforms, check_same_size, make_sample, map_raw_labels, masks_from_semantic


@dataclass(frozen=True)
class CityscapesLabel:
    name: str
    label_id: int
    train_id: int  # 255 = ignored in training and evaluation
    has_instances: bool
    color: tuple[int, int, int]


IGNORE = 255

# The 34 official label ids (the -1 "license plate" id never appears in label images: it is drawn as its vehicle).
LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, IGNORE, False, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, IGNORE, False, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, IGNORE, False, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, IGNORE, False, (0, 0, 0)),
    CityscapesLabel("static", 4, IGNORE, False, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, IGNORE, False, (111, 74, 0)),
    CityscapesLabel("ground", 6, IGNORE, False, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, False, (244, 35, 232)),
    CityscapesLabel("parking", 9, IGNORE, False, (250, 170, 160)),
    CityscapesLabel("rail track", 10, IGNORE, False, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, IGNORE, False, (180, 165, 180)),
    CityscapesLabel("bridge", 15, IGNORE, False, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, IGNORE, False, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, IGNORE, False, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, True, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, True, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, True, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, True, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, True, (0, 60, 100)),
    CityscapesLabel("caravan", 29, IGNORE, True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, IGNORE, True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, True, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, True, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, True, (119, 11, 32)),
)


def cityscapes_label_space() -> LabelSpace:
    """The 19 train classes (contiguous id = trainId); dataset ids are the official label ids."""
    train_labels = sorted((label for label in LABELS if label.train_id != IGNORE), key=lambda label: label.train_id)
    return LabelSpace(
        names=[label.name for label in train_labels],
        is_thing=[label.has_instances for label in train_labels],
        dataset_ids=[label.label_id for label in train_labels],
        ignore_index=IGNORE,
        colors=[label.color for label in train_labels],
    )


def label_id_to_train_id_table() -> np.ndarray:
    """int64[34]: official label id -> trainId (255 for classes ignored in evaluation)."""
    table = np.full(len(LABELS), IGNORE, dtype=np.int64)
    for label in LABELS:
        table[label.label_id] = label.train_id
    return table


_THING_LABEL_IDS = np.array([label.has_instances for label in LABELS])


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
            is_thing_label = bool(_THING_LABEL_IDS[label_id])
            if value >= 1000 and not is_thing_label:
                raise ValueError(f"instance label {path} has instance value {value} for stuff class "
                                 f"{LABELS[label_id].name!r} (label id {label_id})")
            labels.append(train_id)
            masks.append(instance_ids == value)
            iscrowd.append(is_thing_label and value < 1000)
        height, width = instance_ids.shape
        masks_array = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return np.array(labels, dtype=np.int64), masks_array, np.array(iscrowd, dtype=bool), semantic
