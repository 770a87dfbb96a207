"""Pascal VOC segmentation (``SegmentationClass/`` + ``SegmentationObject/`` palette PNGs) as a Dataset.

Layout under the root (``VOC2012/``, or a ``VOCdevkit/`` holding one ``VOC*`` folder; also what labelme's
``labelme2voc`` writes): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette index = class,
255 = ignore: VOC's object borders and "difficult" regions), ``SegmentationObject/<id>.png`` (palette index =
object, 0 = background, 255 = ignore) and ``ImageSets/Segmentation/<split>.txt`` (the ids of a split). labelme2voc's
``SegmentationClassPNG/`` and ``SegmentationObjectPNG/`` are read in place of the first two.

Classes: ``labels.txt`` or labelme2voc's ``class_names.txt`` at the root (one name a line, PNG value = line number
after a leading ``__ignore__``), else VOC's background + 20 classes. ``background`` (``_background_``) is a stuff
class (one segment per image), the others things; a ``classes.yaml`` (or ``data.extra.labels``) overrides that.
Each object of ``SegmentationObject`` is one segment, its class the most common class value under it. Without
``SegmentationObject`` PNGs each present class is one segment (semantic data). ``iscrowd`` is False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..image_io import read_image, read_label_png
from ..label_space import LabelSpace
from ._common import Transforms, apply_transforms, check_same_size, make_sample, map_raw_labels, masks_from_semantic
from ._counts import logger
from .ade20k import IMAGE_SUFFIXES

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOID = 255


def voc_label_space(names: list[str] | None = None) -> LabelSpace:
    """Classes with PNG value = position; the background class stuff, the rest things."""
    names = [("background" if name == "_background_" else name) for name in (names or list(VOC_CLASSES))]
    return LabelSpace(names=names, is_thing=[name != "background" for name in names])


def read_class_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if names and names[0] == "__ignore__":  # labelme's labels.txt: __ignore__ is -1 (255 in the PNGs)
        names = names[1:]
    if "__ignore__" in names:
        raise ValueError(f"{path}: '__ignore__' may only be the first line")
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def _find_root(root: Path) -> Path:
    if (root / "JPEGImages").is_dir():
        return root
    inner = [child for child in sorted(root.glob("VOC*")) if (child / "JPEGImages").is_dir()]
    if len(inner) == 1:
        return inner[0]
    raise FileNotFoundError(f"voc: no JPEGImages/ folder in {root}" + (f" (several VOC* folders: "
                            f"{[p.name for p in inner]}; point data.root at one)" if inner else ""))


def _png_folder(root: Path, name: str) -> Path | None:
    for folder in (root / name, root / f"{name}PNG"):
        if folder.is_dir() and any(folder.glob("*.png")):
            return folder
    return None


class VocDataset(Dataset):
    """Samples of one split of a Pascal VOC style segmentation folder.

    Args:
        root: ``VOC2012/`` (or a ``VOCdevkit/`` with one ``VOC*`` folder).
        split: the ``ImageSets/Segmentation/<split>.txt`` list. Without any list, ``all_without_list=True`` takes
            every labelled image (labelme2voc writes no lists).
        label_space: a ``LabelSpace`` or the path of a ``classes.yaml``; dataset ids must be the PNG values.
        transforms: callable applied to each sample dict.
    """

    def __init__(self, root: str | Path, split: str = "train", label_space: LabelSpace | str | Path | None = None,
                 all_without_list: bool = True, transforms: Transforms = None) -> None:
        self.root = _find_root(Path(root))
        self.transforms = transforms
        self.class_dir = _png_folder(self.root, "SegmentationClass")
        if self.class_dir is None:
            raise FileNotFoundError(f"voc: no SegmentationClass/*.png under {self.root}")
        self.object_dir = _png_folder(self.root, "SegmentationObject")
        self.label_space = self._label_space(label_space)
        self._table = self.label_space.lookup_table(max(self.label_space.dataset_ids) + 1)
        list_path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if list_path.is_file():
            self.ids = [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]
        elif all_without_list and not any((self.root / "ImageSets" / "Segmentation").glob("*.txt")):
            self.ids = sorted(path.stem for path in self.class_dir.glob("*.png"))
        else:
            raise FileNotFoundError(f"voc: split list not found: {list_path}; data.val_fraction holds out a "
                                    f"validation split from the training one")
        self.image_paths = [self._image_path(image_id, list_path) for image_id in self.ids]
        logger.info(f"{self.root} {split}: {len(self.ids)} image(s), {self.label_space.num_classes} classes"
                    f"{'' if self.object_dir else ' (no SegmentationObject: one segment per class)'}")

    def _label_space(self, label_space: LabelSpace | str | Path | None) -> LabelSpace:
        if isinstance(label_space, LabelSpace):
            return label_space
        if label_space is not None:
            return LabelSpace.from_yaml(label_space)
        if (self.root / "classes.yaml").is_file():
            return LabelSpace.from_yaml(self.root / "classes.yaml")
        for name in ("labels.txt", "class_names.txt"):
            if (self.root / name).is_file():
                return voc_label_space(read_class_list(self.root / name))
        return voc_label_space()

    def _image_path(self, image_id: str, list_path: Path) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise FileNotFoundError(f"{list_path if list_path.is_file() else self.class_dir}: image {image_id!r} not "
                                f"found: {self.root / 'JPEGImages' / image_id}.jpg")

    def sample_keys(self) -> list[str]:
        return list(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, image_path = self.ids[index], self.image_paths[index]
        image = read_image(image_path)
        class_path = self.class_dir / f"{image_id}.png"
        raw = read_label_png(class_path)
        check_same_size(image, raw.shape, image_path, class_path)
        ignore = self.label_space.ignore_index
        semantic = map_raw_labels(raw, self._table, ignore, class_path, ignore_values=(VOID,))
        object_path = self.object_dir / f"{image_id}.png" if self.object_dir is not None else None
        if object_path is None or not object_path.is_file():
            labels, masks = masks_from_semantic(semantic, ignore)
        else:
            labels, masks = self._objects(semantic, object_path, image, image_path)
        sample = make_sample(image, labels, masks, [False] * len(labels), semantic, image_id, str(image_path))
        return apply_transforms(sample, self.transforms)

    def _objects(self, semantic: np.ndarray, object_path: Path, image: Any, image_path: Path) -> tuple[Any, Any]:
        objects = read_label_png(object_path)
        if objects.ndim != 2:
            raise ValueError(f"{object_path}: expected a palette or grayscale PNG of object ids")
        check_same_size(image, objects.shape, image_path, object_path)
        ignore = self.label_space.ignore_index
        labels, masks = [], []
        for stuff in self.label_space.stuff_ids:  # stuff: one segment per class (VOC's background)
            mask = semantic == stuff
            if mask.any():
                labels.append(stuff)
                masks.append(mask)
        for object_id in np.unique(objects):
            if object_id in (0, VOID):
                continue
            mask = objects == object_id
            values, counts = np.unique(semantic[mask], return_counts=True)
            keep = values != ignore
            if not keep.any():
                logger.warning(f"{object_path}: object {int(object_id)} lies on ignored pixels only; skipped")
                continue
            label = int(values[keep][np.argmax(counts[keep])])
            if not self.label_space.is_thing[label]:
                logger.warning(f"{object_path}: object {int(object_id)} is class "
                               f"{self.label_space.names[label]!r}, a stuff class; merged into its stuff segment")
                continue
            labels.append(label)
            masks.append(mask & (semantic == label))
        height, width = semantic.shape
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return np.asarray(labels, dtype=np.int64), stacked
