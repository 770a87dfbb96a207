"""labelme: a folder of per-image JSON files (``shapes`` of polygons, rectangles, circles) as a Dataset.

Conventions (labelme's own ``labelme2voc``/``shapes_to_label`` where it has one):
- Shapes are rasterised as labelme's ``shape_to_mask`` does (PIL polygon/rectangle/ellipse, outline included;
  :func:`~mask2former.data.polygons.rasterize`) and painted in file order: a later shape paints over earlier ones,
  so segments never overlap. A segment left with no pixel is dropped with a warning.
- One object is the shapes sharing ``(label, group_id)``; a shape with ``group_id`` null is an object of its own.
  Stuff classes give one segment per class. ``flags: {"iscrowd": true}`` marks a crowd region.
- Label ``__ignore__`` paints an ignored region (IGNORE in ``semantic``, part of no segment); pixels no shape
  covers are ignored too (labelme's ``_background_`` is "unlabelled" here, not a class).
- ``point``, ``line`` and ``linestrip`` shapes enclose no area: they are skipped and counted (labelme2voc paints
  them as 10-pixel strokes, an artefact of its drawing, not an annotated region). ``mask`` shapes (labelme >= 5.3:
  two corners and a base64 PNG of the box) are read.
- Classes: ``classes.yaml`` (the ``folder`` format's file: names and which are stuff) beside or above the folder,
  else ``labels.txt`` beside or above it (one name a line, ``__ignore__``/``_background_`` skipped, as labelme's
  tools write it), else the labels in the order the files first name them; all things unless ``classes.yaml`` says.
- The image is the embedded ``imageData`` when present (as labelme loads it), else ``imagePath`` relative to the
  JSON file.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..image_io import read_image, to_rgb_array
from ..label_space import LabelSpace
from ..polygons import rasterize
from ._common import Transforms, apply_transforms, make_sample
from ._counts import AnnotationCounts

logger = logging.getLogger("mask2former.data")

IGNORE_LABEL = "__ignore__"
BACKGROUND_LABEL = "_background_"
AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
SKIPPED_SHAPES = ("point", "line", "linestrip", "points")


def _find_beside_or_above(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def read_labels_txt(path: Path) -> list[str]:
    """Class names from a labelme ``labels.txt``, without ``__ignore__`` and ``_background_``."""
    names = [line.strip() for line in path.read_text().splitlines()]
    return [name for name in names if name and name not in (IGNORE_LABEL, BACKGROUND_LABEL)]


def _decode_image_data(data: str, where: str) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
        array = to_rgb_array(ImageOps.exif_transpose(image))
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{where}: imageData is not a readable base64 image ({' '.join(str(error).split())})") \
            from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _decode_mask(data: Any, where: str) -> np.ndarray:
    if not isinstance(data, str):
        raise ValueError(f"{where}: a mask shape needs its base64 PNG in 'mask'")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        return np.asarray(image).astype(bool).reshape(image.size[1], image.size[0], -1).any(axis=2)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{where}: 'mask' is not a readable base64 PNG ({' '.join(str(error).split())})") from None


def parse_shape(shape: Any, where: str) -> tuple[str, np.ndarray] | str:
    """``(kind, points)`` of an area shape, or the reason string of a shape to skip; bad shapes are errors."""
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"]:
        raise ValueError(f"{where}: a shape needs a non-empty 'label'")
    kind = shape.get("shape_type") or "polygon"  # labelme < 4 writes no shape_type: polygons
    if kind in SKIPPED_SHAPES:
        return f"{kind} shapes (no area)"
    if kind not in AREA_SHAPES:
        raise ValueError(f"{where}: unknown shape_type {kind!r} (expected one of {', '.join(AREA_SHAPES)}, or "
                         f"{', '.join(SKIPPED_SHAPES[:3])} which are skipped)")
    try:
        points = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'points' must be a list of [x, y] pairs") from None
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise ValueError(f"{where}: 'points' must be a list of [x, y] pairs")
    if kind == "polygon" and len(points) < 3:
        raise ValueError(f"{where}: polygon with {len(points)} point(s); a polygon needs at least 3")
    if kind in ("rectangle", "circle", "mask") and len(points) != 2:
        raise ValueError(f"{where}: {kind} with {len(points)} point(s); it needs exactly 2")
    return kind, points


def classes_named_in(paths: list[Path]) -> LabelSpace | None:
    """All-thing classes in the order the labelme files (in this order) first name them; None if they name none.
    Used over all split folders so that ``train`` and ``val`` agree without a ``labels.txt``."""
    names: dict[str, None] = {}
    for path in paths:
        try:
            shapes = json.loads(path.read_text()).get("shapes", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # the reader of that folder reports it with the file name
        for shape in shapes if isinstance(shapes, list) else []:
            label = shape.get("label") if isinstance(shape, dict) else None
            if isinstance(label, str) and label and label != IGNORE_LABEL:
                names.setdefault(label)
    return LabelSpace(names=list(names), is_thing=[True] * len(names)) if names else None


class LabelmeDataset(Dataset):
    """Samples from a folder of labelme JSON files (sorted by name).

    Args:
        folder: the folder holding the ``*.json`` files.
        label_space: a ``LabelSpace`` or a path to its YAML; default as the module docstring says.
        transforms: callable applied to each sample dict.
    """

    def __init__(self, folder: str | Path, label_space: LabelSpace | str | Path | None = None,
                 transforms: Transforms = None) -> None:
        self.folder = Path(folder)
        self.transforms = transforms
        if not self.folder.is_dir():
            raise FileNotFoundError(f"labelme folder not found: {self.folder}")
        self.files = sorted(self.folder.glob("*.json"))
        if not self.files:
            raise FileNotFoundError(f"no labelme *.json files in {self.folder}")
        self.records = [self._load(path) for path in self.files]
        self.label_space = self._label_space(label_space)
        self.counts = AnnotationCounts()
        known = set(self.label_space.names)
        for record in self.records:
            for index, shape in enumerate(record["shapes"]):
                label = shape["label"]
                if label != IGNORE_LABEL and label not in known:
                    raise ValueError(f"{record['path']} shape {index}: label {label!r} is not one of the classes "
                                     f"({self._class_source})")
                if isinstance(shape["parsed"], str):
                    self.counts.skip(label, shape["parsed"])
                else:
                    self.counts.read(label)
        self.counts.log(str(self.folder))

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: invalid JSON ({' '.join(str(error).split())})") from None
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise ValueError(f"{path}: not a labelme file (expected an object with a 'shapes' list)")
        if not data.get("imagePath") and not data.get("imageData"):
            raise ValueError(f"{path}: neither 'imagePath' nor 'imageData': labelme needs one to find the image")
        shapes = []
        for index, shape in enumerate(data["shapes"]):
            parsed = parse_shape(shape, f"{path} shape {index}")
            mask = _decode_mask(shape.get("mask"), f"{path} shape {index}") \
                if not isinstance(parsed, str) and parsed[0] == "mask" else None
            flags = shape.get("flags") if isinstance(shape.get("flags"), dict) else {}
            shapes.append({"label": shape["label"], "group_id": shape.get("group_id"), "parsed": parsed,
                           "mask": mask, "iscrowd": bool(flags.get("iscrowd", False))})
        return {"path": path, "imagePath": data.get("imagePath"), "imageData": data.get("imageData"),
                "height": data.get("imageHeight"), "width": data.get("imageWidth"), "shapes": shapes}

    def _label_space(self, label_space: LabelSpace | str | Path | None) -> LabelSpace:
        if isinstance(label_space, LabelSpace):
            self._class_source = "the given label space"
            return label_space
        if label_space is not None:
            self._class_source = str(label_space)
            return LabelSpace.from_yaml(label_space)
        yaml_path = _find_beside_or_above(self.folder, "classes.yaml")
        if yaml_path is not None:
            self._class_source = str(yaml_path)
            return LabelSpace.from_yaml(yaml_path)
        txt_path = _find_beside_or_above(self.folder, "labels.txt")
        if txt_path is not None:
            self._class_source = str(txt_path)
            names = read_labels_txt(txt_path)
            if not names:
                raise ValueError(f"{txt_path}: no class names (besides __ignore__/_background_)")
            return LabelSpace(names=names, is_thing=[True] * len(names))
        self._class_source = "the labels the files name"
        names = list(dict.fromkeys(shape["label"] for record in self.records for shape in record["shapes"]
                                   if shape["label"] != IGNORE_LABEL))
        if not names:
            raise ValueError(f"{self.folder}: no labelled shapes, so no classes; add a labels.txt")
        return LabelSpace(names=names, is_thing=[True] * len(names))

    def sample_keys(self) -> list[str]:
        """A stable name per sample (for ``data.val_fraction``)."""
        return [path.name for path in self.files]

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: dict[str, Any]) -> tuple[torch.Tensor, str]:
        path = record["path"]
        if record["imageData"]:
            return _decode_image_data(record["imageData"], str(path)), str(path)
        image_path = path.parent / record["imagePath"].replace("\\", "/")  # labelme on Windows writes backslashes
        if not image_path.is_file():
            # Files moved from another machine keep its paths: the same name beside the JSON is the image.
            beside = path.parent / Path(record["imagePath"].replace("\\", "/")).name
            if not beside.is_file():
                raise FileNotFoundError(f"{path}: image file not found: {image_path} (imagePath "
                                        f"{record['imagePath']!r}; nor {beside.name} beside the JSON)")
            image_path = beside
        return read_image(image_path), str(image_path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, file_name = self._image(record)
        height, width = int(image.shape[1]), int(image.shape[2])
        if record["height"] is not None and record["width"] is not None and \
                (int(record["height"]), int(record["width"])) != (height, width):
            raise ValueError(f"{record['path']}: imageHeight x imageWidth {record['height']}x{record['width']} "
                             f"differs from the image's {height}x{width}")
        space = self.label_space
        segment_map = np.full((height, width), -1, dtype=np.int32)  # -1 unlabelled, -2 ignored, k segment k
        keys: dict[Any, int] = {}
        labels: list[int] = []
        crowd: list[bool] = []
        for position, shape in enumerate(record["shapes"]):
            if isinstance(shape["parsed"], str):
                continue
            mask = self._shape_mask(shape, height, width)
            if shape["label"] == IGNORE_LABEL:
                segment_map[mask] = -2
                continue
            label = space.names.index(shape["label"])
            if not space.is_thing[label]:
                key: Any = ("stuff", label)
            elif shape["group_id"] is None:
                key = ("shape", position)
            else:
                key = ("group", label, shape["group_id"])
            if key not in keys:
                keys[key] = len(labels)
                labels.append(label)
                crowd.append(shape["iscrowd"])
            segment_map[mask] = keys[key]
        masks = segment_map[None] == np.arange(len(labels))[:, None, None]
        present = masks.reshape(len(labels), -1).any(axis=1)
        if not present.all():
            lost = [space.names[label] for label, kept in zip(labels, present) if not kept]
            logger.warning(f"{record['path']}: {len(lost)} object(s) fully covered by later shapes: {lost}")
        semantic = np.full((height, width), space.ignore_index, dtype=np.int64)
        lookup = np.asarray(labels, dtype=np.int64)
        painted = segment_map >= 0
        semantic[painted] = lookup[segment_map[painted]]
        keep = np.flatnonzero(present)
        sample = make_sample(image, lookup[keep], masks[keep], np.asarray(crowd, dtype=bool)[keep], semantic,
                             record["path"].stem, file_name)
        return apply_transforms(sample, self.transforms)

    @staticmethod
    def _shape_mask(shape: dict[str, Any], height: int, width: int) -> np.ndarray:
        kind, points = shape["parsed"]
        if kind != "mask":
            return rasterize([(kind, points)], height, width)
        # labelme's mask shape: the PNG covers the box from the first corner (rounded) on.
        mask = np.zeros((height, width), dtype=bool)
        x0, y0 = (int(round(value)) for value in points.min(axis=0))
        patch = shape["mask"][: max(height - y0, 0), : max(width - x0, 0)]
        mask[max(y0, 0): y0 + patch.shape[0], max(x0, 0): x0 + patch.shape[1]] = \
            patch[max(-y0, 0):, max(-x0, 0):]
        return mask
