"""The standard results files, written by ``evaluate --save-predictions`` and ``predict``, read by
``evaluate --predictions`` (and by panopticapi, pycocotools, detectron2's evaluators and the COCO test server).

A predictions folder ``DIR`` holds, per task:

- panoptic: ``DIR/panoptic.json`` (COCO panoptic results: ``{"annotations": [{"image_id", "file_name",
  "segments_info": [{"id", "category_id", "isthing", "score"}]}], "categories": [...]}``) and
  ``DIR/panoptic/<stem>.png`` (RGB, id = R + 256 G + 256^2 B, 0 = void);
- instance: ``DIR/instances.json``, the COCO results list ``[{"image_id", "category_id", "segmentation" (RLE,
  counts as text), "score", "bbox" ([x, y, w, h] of the mask)}]``, what ``pycocotools.COCO.loadRes`` reads;
- semantic: ``DIR/semantic/<stem>.png``, a label map in the data set's own label values (what its ground truth
  PNGs store: ``LabelSpace.dataset_ids``); ``ignore_index`` where the prediction is none of the data set's classes
  (a model class the data set lacks, ``label_subset.py``), which scores as a miss.

Category ids are the data set's ids (``LabelSpace.to_dataset``), image ids are the data set's image ids, and
``<stem>`` is the image file's stem. Reading validates everything against the ground truth: a missing PNG, an
unknown category id, an image id not in the ground truth, or a segment id in a PNG but not in the JSON (or the
reverse) is a one-line error naming the file and the id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ..data.formats.coco import annotation_to_rle
from ..data.formats.coco_panoptic import id_to_rgb, read_segment_map
from ..data.image_io import read_label_png
from ..data.json_io import dumps
from ..data.label_space import LabelSpace
from .instance import encode_masks

__all__ = ["ResultsWriter", "SavedPredictions", "file_stem", "remove_results_files", "RESULT_FILES"]

# What marks a task's results in a predictions folder.
RESULT_FILES = {"panoptic": "panoptic.json", "instance": "instances.json", "semantic": "semantic"}
# Result PNGs are label maps (large flat regions): zlib level 1 writes the same pixels ~3x faster than the default 6.
PNG_LEVEL = 1


def file_stem(image_id: Any, file_name: str | None = None) -> str:
    """The stem result PNGs are named by: the image file's stem, else COCO's 12-digit form of a numeric id."""
    if file_name:
        return Path(file_name).stem
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return f"{int(image_id):012d}"
    return str(image_id)


def _plain_id(image_id: Any) -> Any:
    """JSON-able image id (numpy / torch ints become ints)."""
    if hasattr(image_id, "item"):
        image_id = image_id.item()
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
        raise ValueError(f"image id {image_id!r} is neither an int nor a string; the COCO results formats need one")
    return image_id


class ResultsWriter:
    """Writes one image's results at a time (PNGs immediately), the JSON files on ``close()``."""

    def __init__(self, out_dir: str | Path, label_space: LabelSpace, tasks: Iterable[str]) -> None:
        self.out_dir = Path(out_dir)
        self.label_space = label_space
        self.tasks = tuple(tasks)
        unknown = sorted(set(self.tasks) - set(RESULT_FILES))
        if unknown:
            raise ValueError(f"results files: unknown task {unknown[0]!r}")
        # Contiguous id -> label value; the extra last entry is -1 ("no class of the data set") -> ignore_index.
        self._dataset_ids = np.asarray([*label_space.dataset_ids, label_space.ignore_index], dtype=np.int64)
        self._panoptic: list[dict[str, Any]] = []
        self._instances: list[dict[str, Any]] = []
        self._stems: set[str] = set()
        self._image_ids: set[Any] = set()
        for task in self.tasks:
            if task in ("panoptic", "semantic"):
                (self.out_dir / task).mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, image_id: Any, stem: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """One image's ``{task: result}`` in the ``Predictor`` formats (contiguous class ids); returns the JSON
        entries it added (``{"panoptic": entry, "instance": [entries]}``, as far as written)."""
        image_id = _plain_id(image_id)
        first_instance = len(self._instances)
        if image_id in self._image_ids:
            raise ValueError(f"results files: image id {image_id!r} written twice")
        if stem in self._stems:
            raise ValueError(f"results files: two images share the file stem {stem!r} (image id {image_id!r}); "
                             f"their result PNGs would overwrite each other")
        self._image_ids.add(image_id)
        self._stems.add(stem)
        if "panoptic" in self.tasks:
            segment_map, segments_info = result["panoptic"]
            ids = torch.as_tensor(segment_map).cpu().numpy().astype(np.int64)
            Image.fromarray(id_to_rgb(ids)).save(self.out_dir / "panoptic" / f"{stem}.png", compress_level=PNG_LEVEL)
            self._panoptic.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": [
                {"id": int(info["id"]), "category_id": self.label_space.to_dataset(int(info["category_id"])),
                 "isthing": int(self.label_space.is_thing[int(info["category_id"])]),
                 **({"score": float(info["score"])} if "score" in info else {})}
                for info in segments_info
            ]})
        if "instance" in self.tasks:
            instances = result["instance"]
            for rle, label, score in zip(encode_masks(instances["masks"]), instances["labels"].tolist(),
                                         instances["scores"].float().tolist()):
                self._instances.append({
                    "image_id": image_id, "category_id": self.label_space.to_dataset(int(label)),
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "score": score, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                })
        if "semantic" in self.tasks:
            values = self._dataset_ids[torch.as_tensor(result["semantic"]).cpu().numpy().astype(np.int64)]  # -1: last
            dtype = np.uint8 if values.max(initial=0) < 256 else np.uint16
            Image.fromarray(values.astype(dtype)).save(self.out_dir / "semantic" / f"{stem}.png", compress_level=PNG_LEVEL)
        added: dict[str, Any] = {}
        if "panoptic" in self.tasks:
            added["panoptic"] = self._panoptic[-1]
        if "instance" in self.tasks:
            added["instance"] = self._instances[first_instance:]
        return added

    def state(self) -> dict[str, Any]:
        """The JSON entries and the ids and stems written so far: what :meth:`merge` takes (from another process's
        writer into the same folder)."""
        return {"panoptic": self._panoptic, "instances": self._instances, "image_ids": sorted(self._image_ids, key=str),
                "stems": sorted(self._stems)}

    def merge(self, state: Mapping[str, Any]) -> None:
        """Append the entries of another writer's :meth:`state` (its PNGs are already in the folder); an image id
        or stem written by both is an error, as within one writer."""
        for key, seen, what in (("image_ids", self._image_ids, "image id"), ("stems", self._stems, "file stem")):
            twice = seen.intersection(state[key])
            if twice:
                raise ValueError(f"results files: {what} {sorted(twice, key=str)[0]!r} written by two processes")
            seen.update(state[key])
        self._panoptic.extend(state["panoptic"])
        self._instances.extend(state["instances"])

    def close(self) -> dict[str, Path]:
        """Write the JSON files (each via a temporary name and a rename: an interrupted run leaves none that looks
        complete); returns ``{task: path}`` of what holds each task's results."""
        written: dict[str, Path] = {}
        if "panoptic" in self.tasks:
            path = self.out_dir / RESULT_FILES["panoptic"]
            _atomic_write(path, dumps({"annotations": self._panoptic,
                                            "categories": self.label_space.to_coco_categories()}))
            written["panoptic"] = path
        if "instance" in self.tasks:
            path = self.out_dir / RESULT_FILES["instance"]
            _atomic_write(path, dumps(self._instances))
            written["instance"] = path
        if "semantic" in self.tasks:
            written["semantic"] = self.out_dir / "semantic"
        return written


def remove_results_files(out_dir: str | Path) -> None:
    """Delete the results JSONs of an earlier run in ``out_dir`` (before a run that rewrites the folder), so that a
    run that stops half way leaves no JSON that looks like its complete results."""
    for task in ("panoptic", "instance"):
        (Path(out_dir) / RESULT_FILES[task]).unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None


class SavedPredictions:
    """A predictions folder, validated against the ground truth's image ids and label space.

    ``tasks()`` lists the tasks whose files are present; ``result(image_id, stem, size)`` gives that image's
    ``{task: result}`` in the ``Predictor`` formats, as ``evaluate`` feeds its evaluators.
    """

    def __init__(self, directory: str | Path, label_space: LabelSpace, image_ids: Iterable[Any]) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"predictions folder not found: {self.dir}")
        self.label_space = label_space
        self.gt_ids = [_plain_id(image_id) for image_id in image_ids]
        known = set(self.gt_ids)
        self.available = [task for task, name in RESULT_FILES.items() if (self.dir / name).exists()]
        self._panoptic: dict[Any, dict[str, Any]] = {}
        self._instances: dict[Any, list[dict[str, Any]]] = {}
        if "panoptic" in self.available:
            self._load_panoptic(known)
        if "instance" in self.available:
            self._load_instances(known)

    def tasks(self) -> list[str]:
        return list(self.available)

    def _category(self, category_id: Any, where: str, thing_only: bool = False) -> int:
        contiguous = self.label_space.to_contiguous(category_id, where=where)
        if thing_only and not self.label_space.is_thing[contiguous]:
            raise ValueError(f"{where}: category id {category_id!r} ({self.label_space.names[contiguous]!r}) is not "
                             f"a thing class; instance results hold thing classes only")
        return contiguous

    def _load_panoptic(self, known: set[Any]) -> None:
        path = self.dir / RESULT_FILES["panoptic"]
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: expected COCO panoptic results, a dict with an 'annotations' list")
        for entry in data["annotations"]:
            image_id = entry.get("image_id") if isinstance(entry, dict) else None
            if image_id not in known:
                raise ValueError(f"{path}: image id {image_id!r} is not in the ground truth")
            if image_id in self._panoptic:
                raise ValueError(f"{path}: image id {image_id!r} has more than one entry")
            if "file_name" not in entry or not isinstance(entry.get("segments_info"), list):
                raise ValueError(f"{path}: image id {image_id!r} needs 'file_name' and a 'segments_info' list")
            seen: set[int] = set()
            for segment in entry["segments_info"]:
                segment_id = segment.get("id")
                where = f"{path} image id {image_id!r} segment {segment_id!r}"
                if isinstance(segment_id, bool) or not isinstance(segment_id, int) or segment_id <= 0:
                    raise ValueError(f"{where}: segment ids must be positive ints (0 is void)")
                if segment_id in seen:
                    raise ValueError(f"{where}: duplicate segment id")
                seen.add(segment_id)
                self._category(segment.get("category_id"), where)
            self._panoptic[image_id] = entry
        missing = [image_id for image_id in self.gt_ids if image_id not in self._panoptic]
        if missing:
            raise ValueError(f"{path}: no prediction for image id {missing[0]!r} ({len(missing)} image(s) missing)")

    def _load_instances(self, known: set[Any]) -> None:
        path = self.dir / RESULT_FILES["instance"]
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected the COCO results list [{{image_id, category_id, segmentation, "
                             f"score}}, ...]")
        for position, entry in enumerate(data):
            image_id = entry.get("image_id") if isinstance(entry, dict) else None
            where = f"{path} result #{position} (image id {image_id!r})"
            if image_id not in known:
                raise ValueError(f"{path}: image id {image_id!r} (result #{position}) is not in the ground truth")
            for key in ("category_id", "segmentation", "score"):
                if key not in entry:
                    raise ValueError(f"{where}: no {key!r}")
            self._category(entry["category_id"], where, thing_only=True)
            self._instances.setdefault(image_id, []).append(entry)

    def result(self, image_id: Any, stem: str, size: tuple[int, int]) -> dict[str, Any]:
        """``{task: result}`` for one ground-truth image of ``size`` (H, W)."""
        image_id = _plain_id(image_id)
        height, width = size
        out: dict[str, Any] = {}
        if "panoptic" in self.available:
            out["panoptic"] = self._panoptic_result(image_id, size)
        if "instance" in self.available:
            entries = self._instances.get(image_id, [])
            masks = np.zeros((len(entries), height, width), dtype=bool)
            labels, scores = [], []
            for index, entry in enumerate(entries):
                where = f"{self.dir / RESULT_FILES['instance']} image id {image_id!r}"
                masks[index] = mask_utils.decode(annotation_to_rle(entry["segmentation"], height, width, where))
                labels.append(self._category(entry["category_id"], where, thing_only=True))
                scores.append(float(entry["score"]))
            out["instance"] = {"masks": torch.from_numpy(masks), "labels": torch.tensor(labels, dtype=torch.int64),
                               "scores": torch.tensor(scores, dtype=torch.float32)}
        if "semantic" in self.available:
            path = self.dir / "semantic" / f"{stem}.png"
            if not path.is_file():
                raise FileNotFoundError(f"semantic prediction {path} for image id {image_id!r} not found")
            raw = read_label_png(path)
            if raw.ndim != 2:
                raise ValueError(f"semantic prediction {path} has shape {raw.shape}; expected a single-channel label map")
            if raw.shape != (height, width):
                raise ValueError(f"semantic prediction {path} is {raw.shape[1]}x{raw.shape[0]} (WxH), its image "
                                 f"{image_id!r} is {width}x{height}")
            raw = raw.astype(np.int64)
            table = self.label_space.lookup_table(max(int(raw.max(initial=0)), max(self.label_space.dataset_ids)) + 1)
            semantic = table[raw]
            unknown = (semantic < 0) & (raw != self.label_space.ignore_index)  # ignore_index: no class, a miss
            if unknown.any():
                bad = sorted(set(raw[unknown].tolist()))
                raise ValueError(f"semantic prediction {path}: unknown category id(s) {bad[:10]} (image id "
                                 f"{image_id!r})")
            out["semantic"] = torch.from_numpy(semantic)
        return out

    def _panoptic_result(self, image_id: Any, size: tuple[int, int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        entry = self._panoptic[image_id]
        path = self.dir / "panoptic" / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"panoptic prediction {path} for image id {image_id!r} not found")
        where = f"{self.dir / RESULT_FILES['panoptic']} image id {image_id!r}"
        segment_map = read_segment_map(path, (segment["id"] for segment in entry["segments_info"]), where)
        if segment_map.shape != tuple(size):
            raise ValueError(f"panoptic prediction {path} is {segment_map.shape[1]}x{segment_map.shape[0]} (WxH), "
                             f"its image {image_id!r} is {size[1]}x{size[0]}")
        segments = [{"id": int(segment["id"]), "category_id": self._category(segment["category_id"], where),
                     "isthing": self.label_space.is_thing[self._category(segment["category_id"], where)]}
                    for segment in entry["segments_info"]]
        return torch.from_numpy(segment_map), segments
