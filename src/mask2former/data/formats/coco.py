"""COCO instance-segmentation JSON (polygons, uncompressed and compressed RLE, iscrowd) as a Dataset.

Conventions:
- Every image listed in ``images`` is a sample, with or without annotations (detectron2 drops annotation-less
  images only when training with ``FILTER_EMPTY_ANNOTATIONS``; that is the trainer's choice, not the reader's).
- Degenerate polygons (odd coordinate count or fewer than 3 points, e.g. ``[]`` or ``[[]]``) are discarded, and an
  annotation left with no polygon is dropped, as detectron2's ``load_coco_json`` does. The reader warns once per
  JSON with the count and ids, and lists them in ``dropped_annotation_ids``.
- ``semantic`` paints annotations in file order (later ones win where they overlap); pixels covered by no
  annotation are ``ignore_index`` (instance JSONs have no stuff labels).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from torch.utils.data import Dataset

from ..image_io import read_image
from ..label_space import LabelSpace
from ._common import Transforms, apply_transforms, make_sample
from ._counts import AnnotationCounts


def load_coco_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'categories'")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return data


def index_images(data: dict[str, Any], path: Path) -> dict[Any, dict[str, Any]]:
    images: dict[Any, dict[str, Any]] = {}
    for image in data["images"]:
        for key in ("id", "file_name"):
            if key not in image:
                raise ValueError(f"{path}: image entry without {key!r}: {image!r}")
        if image["id"] in images:
            raise ValueError(f"{path}: duplicate image id {image['id']!r}")
        images[image["id"]] = image
    return images


def _valid_polygons(segmentation: list) -> list[list[float]]:
    return [polygon for polygon in segmentation
            if isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0]


def annotation_to_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Polygon list / uncompressed RLE / compressed RLE -> one compressed RLE of size (height, width)."""
    if isinstance(segmentation, list):
        polygons = _valid_polygons(segmentation)
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} (HxW) differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            return {"size": size, "counts": counts.encode("ascii")}
        if isinstance(counts, bytes):
            return {"size": size, "counts": counts}
    raise ValueError(f"{where}: unsupported segmentation {type(segmentation).__name__} "
                     f"(expected polygons or an RLE with 'size' and 'counts')")


def _without_parent_categories(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    used = {annotation.get("category_id") for annotation in data.get("annotations", [])}
    categories = data["categories"]
    parents = {category.get("supercategory") for category in categories}
    dropped = [category for category in categories if category.get("id") not in used
               and category.get("name") in parents
               and any(other.get("supercategory") == category.get("name") and other is not category
                       for other in categories)]
    if dropped:
        logging.getLogger("mask2former.data").info(
            f"{path}: category {[c.get('name') for c in dropped]} (id {[c.get('id') for c in dropped]}) is only the "
            f"parent of the others and has no annotation: not a class")
    return [category for category in categories if all(category is not other for other in dropped)]


class CocoInstanceDataset(Dataset):
    """Samples from a COCO instances JSON plus its image folder.

    Args:
        annotation_file: the ``instances_*.json``.
        image_root: folder holding the images (``file_name`` is relative to it).
        label_space: defaults to the JSON's categories in ascending id order (``isthing`` honoured when present,
            else all things).
        transforms: callable applied to each sample dict.
        drop_parent_categories: drop categories no annotation uses that are the ``supercategory`` of others
            (Roboflow lists its project as category 0, the parent of every class); the drop is logged.
    """

    def __init__(self, annotation_file: str | Path, image_root: str | Path, label_space: LabelSpace | None = None,
                 transforms: Transforms = None, drop_parent_categories: bool = False) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        self.transforms = transforms
        data = load_coco_json(self.annotation_file)
        if drop_parent_categories and label_space is None:
            data["categories"] = _without_parent_categories(data, self.annotation_file)
        self.label_space = label_space or LabelSpace.from_coco_categories(data["categories"],
                                                                          where=str(self.annotation_file))
        images = index_images(data, self.annotation_file)
        for image in images.values():
            for key in ("height", "width"):
                if key not in image:
                    raise ValueError(f"{self.annotation_file}: image {image['id']!r} without {key!r}")
        self.images = list(images.values())
        self.annotations: dict[Any, list[dict[str, Any]]] = {image_id: [] for image_id in images}
        self.dropped_annotation_ids: list[Any] = []
        self.counts = AnnotationCounts()  # logged per class: read, skipped and why
        for annotation in data.get("annotations", []):
            annotation_id = annotation.get("id")
            where = f"{self.annotation_file} annotation {annotation_id!r}"
            image_id = annotation.get("image_id")
            if image_id not in images:
                raise ValueError(f"{self.annotation_file}: annotation {annotation_id!r} refers to missing image id "
                                 f"{image_id!r}")
            name = self.label_space.names[self.label_space.to_contiguous(annotation.get("category_id"), where=where)]
            if "segmentation" not in annotation:
                raise ValueError(f"{where}: no 'segmentation'")
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list) and not _valid_polygons(segmentation):
                self.dropped_annotation_ids.append(annotation_id)
                self.counts.skip(name, "without a valid polygon")
                continue
            self.counts.read(name)
            self.annotations[image_id].append(annotation)
        self.counts.log(str(self.annotation_file))
        if self.dropped_annotation_ids:
            warnings.warn(f"{self.annotation_file}: dropped {len(self.dropped_annotation_ids)} annotation(s) with no "
                          f"valid polygon (ids {self.dropped_annotation_ids[:10]}), as detectron2 does", stacklevel=2)

    def sample_keys(self) -> list[str]:
        """A stable name per sample (for ``data.val_fraction``): the image file names."""
        return [str(image["file_name"]) for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        image_path = self.image_root / info["file_name"]
        image = read_image(image_path)
        height, width = int(info["height"]), int(info["width"])
        if (int(image.shape[1]), int(image.shape[2])) != (height, width):
            raise ValueError(f"image {image_path} is {image.shape[2]}x{image.shape[1]} (WxH) but "
                             f"{self.annotation_file} says {width}x{height} for image id {info['id']!r}")
        annotations = self.annotations[info["id"]]
        masks = np.zeros((len(annotations), height, width), dtype=bool)
        labels = np.zeros(len(annotations), dtype=np.int64)
        iscrowd = np.zeros(len(annotations), dtype=bool)
        semantic = np.full((height, width), self.label_space.ignore_index, dtype=np.int64)
        for position, annotation in enumerate(annotations):
            where = f"{self.annotation_file} annotation {annotation.get('id')!r}"
            rle = annotation_to_rle(annotation["segmentation"], height, width, where)
            masks[position] = mask_utils.decode(rle).astype(bool)
            labels[position] = self.label_space.to_contiguous(annotation["category_id"], where=where)
            iscrowd[position] = bool(annotation.get("iscrowd", 0))
            semantic[masks[position]] = labels[position]
        sample = make_sample(image, labels, masks, iscrowd, semantic, info["id"], str(image_path))
        return apply_transforms(sample, self.transforms)
