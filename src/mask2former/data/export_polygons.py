"""Writing samples as the polygon files labelling tools use: labelme JSON and Ultralytics YOLO segmentation.

Masks become polygons by :func:`~mask2former.data.polygons.mask_to_polygons` (one per 8-connected component), drawn
back by the readers exactly where a polygon can express the mask. What a polygon cannot hold:
- labelme: a hole. The writer orders the shapes so that later ones repaint what earlier ones spill over (stuff
  first, things after; :func:`~mask2former.data.polygons.paint_order`), and unlabelled pixels a shape would cover
  are repainted by ``__ignore__`` shapes. The parts of one object share a ``group_id``; crowd regions carry
  ``flags: {iscrowd: true}``.
- YOLO: holes, stuff classes (YOLO is things only: stuff segments are not written, and counted), objects in
  several parts (one line each: they read back as separate objects, counted) and crowd flags.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import ndimage

from .formats.labelme import BACKGROUND_LABEL, IGNORE_LABEL
from .label_space import LabelSpace
from .polygons import mask_to_polygons, paint_order, rasterize

LABELME_VERSION = "5.5.0"  # the file layout written (labelme reads older and newer versions of it)


def labelme_shapes(labels: np.ndarray, masks: np.ndarray, iscrowd: np.ndarray, label_space: LabelSpace,
                   lost: Counter[str] | None = None) -> list[dict[str, Any]]:
    """The ``shapes`` list of one image, in paint order; empty segments (no polygon) are counted in ``lost``."""
    height, width = masks.shape[1:]
    regions: list[dict[str, Any]] = []
    for index, (label, mask, crowd) in enumerate(zip(labels.tolist(), masks, iscrowd.tolist())):
        polygons = mask_to_polygons(mask)
        if not polygons:
            if lost is not None:
                lost["empty segments (no pixel to draw)"] += 1
            continue
        regions.append({"label": label_space.names[label], "polygons": polygons, "target": mask,
                        "stuff": not label_space.is_thing[label], "crowd": bool(crowd), "group": index})
    painted = [rasterize([("polygon", p) for p in region["polygons"]], height, width) for region in regions]
    unlabelled = ~masks.any(axis=0) if len(masks) else np.ones((height, width), dtype=bool)
    spilled = unlabelled & np.logical_or.reduce(painted) if painted else np.zeros_like(unlabelled)
    if spilled.any():
        # Unlabelled pixels under some shape: repaint the unlabelled components they belong to as ignored.
        components, _ = ndimage.label(unlabelled, structure=np.ones((3, 3), dtype=bool))
        target = np.isin(components, np.unique(components[spilled]))
        polygons = mask_to_polygons(target)
        regions.append({"label": IGNORE_LABEL, "polygons": polygons, "target": target, "stuff": False,
                        "crowd": False, "group": None})
        painted.append(rasterize([("polygon", p) for p in polygons], height, width))
    order = paint_order(painted, [region["target"] for region in regions], [region["stuff"] for region in regions])
    shapes = []
    for index in order:
        region = regions[index]
        joined = len(region["polygons"]) > 1 and not region["stuff"] and region["group"] is not None
        for polygon in region["polygons"]:
            shapes.append({"label": region["label"], "points": polygon.tolist(),
                           "group_id": region["group"] if joined else None, "description": "",
                           "shape_type": "polygon", "flags": {"iscrowd": True} if region["crowd"] else {}})
    return shapes


def write_labelme(image_name: str, height: int, width: int, shapes: list[dict[str, Any]], path: Path) -> None:
    document = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_name,
                "imageData": None, "imageHeight": height, "imageWidth": width}
    path.write_text(json.dumps(document))


def write_labelme_classes(label_space: LabelSpace, out_dir: Path) -> dict[str, Path]:
    """``labels.txt`` (labelme's own class list) and ``classes.yaml`` (which classes are stuff) in ``out_dir``."""
    labels_txt = out_dir / "labels.txt"
    # labelme2voc / labelme2coco expect __ignore__ and _background_ first (ids -1 and 0); our reader skips both.
    labels_txt.write_text("\n".join([IGNORE_LABEL, BACKGROUND_LABEL, *label_space.names]) + "\n")
    classes_yaml = out_dir / "classes.yaml"
    label_space.to_yaml(classes_yaml)
    return {"labels_txt": labels_txt, "classes": classes_yaml}


def yolo_lines(labels: np.ndarray, masks: np.ndarray, iscrowd: np.ndarray, label_space: LabelSpace,
               lost: Counter[str]) -> list[str]:
    """One ``cls x1 y1 x2 y2 ...`` line per polygon (coordinates of pixel centres, normalised); what YOLO cannot
    hold is counted in ``lost``."""
    height, width = masks.shape[1:]
    lines = []
    for label, mask, crowd in zip(labels.tolist(), masks, iscrowd.tolist()):
        if not label_space.is_thing[label]:
            lost["stuff segments (YOLO is things only)"] += 1
            continue
        polygons = mask_to_polygons(mask)
        if not polygons:
            lost["empty segments (no pixel to draw)"] += 1
        if len(polygons) > 1:
            lost["objects in several parts (one line per part)"] += 1
        if crowd:
            lost["crowd flags (YOLO has none)"] += 1
        for polygon in polygons:
            normalised = (polygon + 0.5) / np.array([width, height], dtype=np.float64)
            lines.append(" ".join([str(label), *(f"{value:.6f}" for value in normalised.ravel())]))
    return lines


def write_yolo_yaml(label_space: LabelSpace, out_dir: Path, split: str) -> Path:
    """``data.yaml`` with ``names`` and the split's image folder, merged into one already there (other splits)."""
    path = out_dir / "data.yaml"
    names = dict(enumerate(label_space.names))
    data: dict[str, Any] = {}
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("names") not in (None, names, list(names.values())):
            raise ValueError(f"export: {path} already names other classes than {label_space.names}")
    data["names"] = names
    data["nc"] = len(names)
    data[split] = f"images/{split}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
