"""Ultralytics YOLO segmentation (``data.yaml``, ``images/<split>/``, ``labels/<split>/*.txt``) as a Dataset.

Conventions:
- ``data.yaml``: ``names`` (a list, or a mapping id -> name) gives the classes, all things (YOLO has no stuff);
  ``train`` / ``val`` / ``test`` name a folder of images, a ``.txt`` list of image paths, or a list of either,
  relative to ``path`` (itself relative to the YAML's folder; default the YAML's folder).
- The label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt`` (Ultralytics' rule). An image without one
  has no objects (Ultralytics' "background" image); the log counts them.
- A line is ``cls x1 y1 x2 y2 ...``: at least 3 points, coordinates normalised to [0, 1] with a tolerance of 1e-6
  for float rounding (Ultralytics rejects anything outside; so do we: an error naming file and line). Blank lines
  are skipped; anything else wrong is an error naming the file and the line.
- A normalised coordinate ``u`` falls on the pixel ``floor(u * size)`` (0 and 1 are the image's outer edges; this is
  Ultralytics' ``int(u * size)`` in ``polygon2mask``), and the polygon through those pixels is rasterised as labelme
  does (:func:`~mask2former.data.polygons.rasterize`). The exporter writes pixel centres, ``(x + 0.5) / size``.
- Each line is one object; masks may overlap, ``semantic`` paints them in line order (later wins) and pixels no
  polygon covers are ignored, as for COCO instance files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from ..image_io import read_image
from ..label_space import LabelSpace
from ..polygons import rasterize
from ._common import Transforms, apply_transforms, make_sample
from ._counts import AnnotationCounts, logger
from .ade20k import IMAGE_SUFFIXES

TOLERANCE = 1e-6


def read_data_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"YOLO data.yaml not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise ValueError(f"{path}: expected a mapping with 'names'")
    return data


def yolo_label_space(data: dict[str, Any], path: Path) -> LabelSpace:
    """All-thing classes from ``names`` (a list, or a mapping with int keys; dataset id = the YOLO class id)."""
    names = data["names"]
    if isinstance(names, list):
        pairs = list(enumerate(names))
    elif isinstance(names, dict):
        try:
            pairs = sorted((int(key), value) for key, value in names.items())
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'names' keys must be class ids (ints)") from None
    else:
        raise ValueError(f"{path}: 'names' must be a list or a mapping, got {type(names).__name__}")
    if not pairs:
        raise ValueError(f"{path}: 'names' is empty")
    if "nc" in data and int(data["nc"]) != len(pairs):
        raise ValueError(f"{path}: nc is {data['nc']} but 'names' has {len(pairs)} classes")
    try:
        return LabelSpace(names=[str(name) for _, name in pairs], is_thing=[True] * len(pairs),
                          dataset_ids=[key for key, _ in pairs])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _images_of(entry: Any, base: Path, where: str) -> list[Path]:
    if isinstance(entry, list):
        return [image for item in entry for image in _images_of(item, base, where)]
    if not isinstance(entry, str):
        raise ValueError(f"{where}: expected a path or a list of paths, got {entry!r}")
    path = Path(entry) if Path(entry).is_absolute() else base / entry
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file() and path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        # Ultralytics' lists hold paths relative to the list's folder ("./images/x.jpg") or absolute ones.
        images = [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines]
        for number, image in enumerate(images, start=1):
            if not image.is_file():
                raise FileNotFoundError(f"{path} line {number}: image file not found: {image}")
        return images
    raise FileNotFoundError(f"{where}: image folder or list not found: {path}")


def label_path_of(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image_path.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, label_space: LabelSpace) -> list[tuple[int, np.ndarray]]:
    """``(contiguous class, normalised points [N, 2])`` per line; bad lines are errors naming file and line."""
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        try:
            class_id = int(fields[0])
            values = np.array([float(value) for value in fields[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{where}: expected 'class x1 y1 x2 y2 ...' numbers, got {line.strip()[:60]!r}") \
                from None
        if class_id not in label_space.dataset_ids:
            raise ValueError(f"{where}: class id {class_id} is not in data.yaml's names "
                             f"(ids {label_space.dataset_ids[0]}..{label_space.dataset_ids[-1]})")
        if len(values) % 2:
            raise ValueError(f"{where}: odd number of coordinates ({len(values)}); a polygon needs x y pairs")
        if len(values) < 6:
            raise ValueError(f"{where}: {len(values) // 2} point(s); a segmentation polygon needs at least 3 "
                             f"(a 'class cx cy w h' box line is detection data, not segmentation)")
        if not np.isfinite(values).all() or values.min() < -TOLERANCE or values.max() > 1 + TOLERANCE:
            bad = values[~(np.isfinite(values) & (values >= -TOLERANCE) & (values <= 1 + TOLERANCE))][0]
            raise ValueError(f"{where}: coordinate {bad:g} is outside [0, 1] (YOLO coordinates are normalised)")
        objects.append((label_space.to_contiguous(class_id), values.reshape(-1, 2)))
    return objects


class YoloDataset(Dataset):
    """Samples of one split of an Ultralytics segmentation data set.

    Args:
        data_yaml: the ``data.yaml``.
        split: its key naming the images (``train``, ``val``, ``test``).
        label_space: overrides the classes of ``names`` (same number of classes).
        transforms: callable applied to each sample dict.
    """

    def __init__(self, data_yaml: str | Path, split: str = "train", label_space: LabelSpace | None = None,
                 transforms: Transforms = None) -> None:
        self.data_yaml = Path(data_yaml)
        self.transforms = transforms
        data = read_data_yaml(self.data_yaml)
        self.label_space = label_space or yolo_label_space(data, self.data_yaml)
        if split not in data or data[split] in (None, ""):
            raise ValueError(f"{self.data_yaml}: no {split!r} split (keys: {sorted(k for k in data if k != 'names')});"
                             f" set data.val_fraction to hold out a validation split from train")
        base = Path(data.get("path") or ".")
        base = base if base.is_absolute() else self.data_yaml.parent / base
        self.image_paths = _images_of(data[split], base, f"{self.data_yaml} {split!r}")
        if not self.image_paths:
            raise FileNotFoundError(f"{self.data_yaml}: the {split!r} split has no images")
        self.objects: list[list[tuple[int, np.ndarray]]] = []
        self.counts = AnnotationCounts()
        without_labels = 0
        for image_path in self.image_paths:
            label_path = label_path_of(image_path)
            objects = parse_label_file(label_path, self.label_space) if label_path.is_file() else []
            without_labels += not label_path.is_file()
            for label, _ in objects:
                self.counts.read(self.label_space.names[label])
            self.objects.append(objects)
        self.counts.log(f"{self.data_yaml} {split}")
        if without_labels:
            logger.info(f"{self.data_yaml} {split}: {without_labels} of {len(self.image_paths)} image(s) have no "
                        f"label file (read as images without objects, as Ultralytics does)")

    def sample_keys(self) -> list[str]:
        return [str(path) for path in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path = self.image_paths[index]
        image = read_image(image_path)
        height, width = int(image.shape[1]), int(image.shape[2])
        objects = self.objects[index]
        scale = np.array([width, height], dtype=np.float64)
        masks = np.zeros((len(objects), height, width), dtype=bool)
        semantic = np.full((height, width), self.label_space.ignore_index, dtype=np.int64)
        for position, (label, points) in enumerate(objects):
            masks[position] = rasterize([("polygon", np.floor(points * scale))], height, width)
            semantic[masks[position]] = label
        labels = [label for label, _ in objects]
        sample = make_sample(image, labels, masks, [False] * len(objects), semantic, image_path.stem,
                             str(image_path))
        return apply_transforms(sample, self.transforms)
