"""Writing samples to real on-disk formats: COCO panoptic, COCO instances (RLE) and semantic PNG folders.

Layouts under ``out_dir`` are detectron2's, so ``data.root=out_dir`` alone reads them back (images are lossless PNGs,
so a read-back is bit-identical):
- ``"coco-panoptic"``: ``<split>/`` images, ``annotations/panoptic_<split>.json`` + ``panoptic_<split>/*.png``, and
  ``annotations/instances_<split>.json`` (the thing segments, as COCO ships both) -- ``data.dataset=coco_panoptic``
  (or ``coco``);
- ``"coco-instance"``: ``<split>/`` images and ``annotations/instances_<split>.json`` with thing classes only --
  ``data.dataset=coco``;
- ``"semantic-png"``: the ``folder`` format: ``images/<split>/``, ``labels/<split>/*.png`` (value = dataset id,
  ``ignore_index`` unlabelled) and ``classes.yaml`` -- ``data.dataset=folder``;
- ``"labelme"``: ``<split>/*.json`` beside their ``<split>/*.png`` images, ``labels.txt`` and ``classes.yaml`` (which
  classes are stuff) -- ``data.dataset=labelme``;
- ``"yolo"``: Ultralytics segmentation: ``images/<split>/``, ``labels/<split>/*.txt`` and ``data.yaml`` -- things
  only, ``data.dataset=yolo``.
The polygon formats' limits (holes, stuff in YOLO, ...) are in :mod:`~mask2former.data.export_polygons`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from .export_polygons import labelme_shapes, write_labelme, write_labelme_classes, write_yolo_yaml, yolo_lines
from .formats.coco_panoptic import id_to_rgb, rgb_to_id
from .label_space import LabelSpace

logger = logging.getLogger("mask2former.data")

FORMATS = ("coco-panoptic", "coco-instance", "semantic-png", "labelme", "yolo")


def _stem(image_id: Any, split: str) -> str:
    # COCO's naming (000000397133.jpg): the numeric stem is the image id, which ``predict`` uses as the id.
    if isinstance(image_id, (int, np.integer)):
        return f"{int(image_id):012d}"
    return str(image_id)


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, width, height]`` of a mask's pixels (zeros for an empty mask)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return [0, 0, 0, 0]
    return [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]


def _unique_segment_id(color: tuple[int, int, int], used: set[int]) -> int:
    """A segment id whose RGB is the category colour, jittered until unused and non-zero (readable PNGs)."""
    step = 0
    candidate = int(rgb_to_id(np.array(color, dtype=np.uint8)))
    while candidate == 0 or candidate in used:
        step += 1
        jittered = np.array([(color[0] + 53 * step) % 256, (color[1] + 97 * step) % 256,
                             (color[2] + 193 * step) % 256], dtype=np.uint8)
        candidate = int(rgb_to_id(jittered))
    used.add(candidate)
    return candidate


def _write_image(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(path)


def _sample_arrays(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (sample["labels"].numpy(), sample["masks"].numpy().astype(bool), sample["iscrowd"].numpy().astype(bool))


def export_samples(samples: Iterable[dict[str, Any]], label_space: LabelSpace, out_dir: str | Path,
                   format: str = "coco-panoptic", split: str = "val") -> dict[str, Path]:
    """Write sample dicts in ``format``; returns the paths written (``images``, ``annotations``, ...)."""
    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {FORMATS}, got {format!r}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split if format in ("semantic-png", "yolo") else out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images_json: list[dict[str, Any]] = []
    annotations_json: list[dict[str, Any]] = []
    instances_json: list[dict[str, Any]] = []  # COCO instances (things): the coco-instance file, and beside panoptic
    panoptic_dir = out_dir / f"panoptic_{split}"
    label_dir = out_dir / "labels" / split
    next_annotation_id = 1  # pycocotools treats annotation id 0 as "unmatched"
    lost: Counter[str] = Counter()  # what the polygon formats cannot hold

    for sample in samples:
        image = sample["image"]
        height, width = int(image.shape[1]), int(image.shape[2])
        stem = _stem(sample["image_id"], split)
        _write_image(image, image_dir / f"{stem}.png")
        images_json.append({"id": sample["image_id"], "file_name": f"{stem}.png", "height": height, "width": width})
        labels, masks, iscrowd = _sample_arrays(sample)

        if format == "coco-panoptic":
            if masks.shape[0] and (masks.sum(axis=0) > 1).any():
                raise ValueError(f"export: segments of sample {sample['image_id']!r} overlap; the panoptic format "
                                 f"needs disjoint segments")
            segment_map = np.zeros((height, width), dtype=np.int64)
            used: set[int] = set()
            segments_info = []
            for label, mask, crowd in zip(labels.tolist(), masks, iscrowd.tolist()):
                if not mask.any():
                    raise ValueError(f"export: sample {sample['image_id']!r} has an empty {label_space.names[label]!r} "
                                     f"segment, which a panoptic PNG cannot hold")
                segment_id = _unique_segment_id(label_space.colors[label], used)
                segment_map[mask] = segment_id
                segments_info.append({"id": segment_id, "category_id": label_space.to_dataset(label),
                                      "iscrowd": int(crowd), "area": int(mask.sum()), "bbox": _bbox(mask)})
            panoptic_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(id_to_rgb(segment_map)).save(panoptic_dir / f"{stem}.png")
            annotations_json.append({"image_id": sample["image_id"], "file_name": f"{stem}.png",
                                     "segments_info": segments_info})
        if format in ("coco-panoptic", "coco-instance"):
            for label, mask, crowd in zip(labels.tolist(), masks, iscrowd.tolist()):
                if not label_space.is_thing[label]:
                    continue
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                instances_json.append({
                    "id": next_annotation_id, "image_id": sample["image_id"],
                    "category_id": label_space.to_dataset(label),
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask.sum()), "bbox": _bbox(mask), "iscrowd": int(crowd),
                })
                next_annotation_id += 1
        if format == "semantic-png":
            semantic = sample["semantic"].numpy()
            dtype = np.uint8 if semantic.max(initial=0) < 256 else np.uint16
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(semantic.astype(dtype)).save(label_dir / f"{stem}.png")
        if format == "labelme":
            shapes = labelme_shapes(labels, masks, iscrowd, label_space, lost)
            write_labelme(f"{stem}.png", height, width, shapes, image_dir / f"{stem}.json")
        if format == "yolo":
            label_dir.mkdir(parents=True, exist_ok=True)
            lines = yolo_lines(labels, masks, iscrowd, label_space, lost)
            (label_dir / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))

    written: dict[str, Path] = {"images": image_dir}
    if format in ("coco-panoptic", "coco-instance"):
        path = out_dir / "annotations" / f"instances_{split}.json"
        categories = [{key: category[key] for key in ("id", "name", "supercategory")}
                      for category in label_space.to_coco_categories() if category["isthing"]]
        _dump_json(path, {"images": images_json, "annotations": instances_json, "categories": categories})
        written.update(annotations=path, instances=path)
    if format == "coco-panoptic":
        path = out_dir / "annotations" / f"panoptic_{split}.json"
        _dump_json(path, {"images": images_json, "annotations": annotations_json,
                          "categories": label_space.to_coco_categories()})
        written.update(annotations=path, panoptic=panoptic_dir)
    elif format == "semantic-png":
        path = out_dir / "classes.yaml"
        LabelSpace(names=label_space.names, is_thing=label_space.is_thing, ignore_index=label_space.ignore_index,
                   colors=label_space.colors).to_yaml(path)
        written.update(annotations=path, labels=label_dir)
    elif format == "labelme":
        written.update(write_labelme_classes(label_space, out_dir), annotations=image_dir)
    elif format == "yolo":
        written.update(annotations=write_yolo_yaml(label_space, out_dir, split), labels=label_dir)
    for what, count in lost.items():
        logger.warning(f"export {format} {out_dir}: {count} {what}")
    return written


def _dump_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(data, handle)


def export_fashion_scenes(out_dir: str | Path, format: str = "coco-panoptic", split: str = "val",
                          num_images: int = 100, seed: int = 0, image_size: int | tuple[int, int] = 256,
                          source: str = "auto") -> dict[str, Path]:
    """Generate FashionScenes and write them in ``format`` (see the module docstring for the layout)."""
    from .fashion_scenes import FashionScenes

    dataset = FashionScenes(split=split, num_images=num_images, seed=seed, image_size=image_size, source=source)
    return export_samples((dataset[index] for index in range(len(dataset))), dataset.label_space, out_dir,
                          format=format, split=split)
