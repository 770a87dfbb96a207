"""``mask2former predict``: run a checkpoint (or an exported ONNX model) on image files and write, per image, a PNG
overlay, plus the standard results files (COCO panoptic results, the COCO results list with RLE masks, or label
PNGs in the data set's values) and a readable ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..data.image_io import read_image
from ..data.label_space import LabelSpace
from ..evaluation.results_files import ResultsWriter
from ..viz import save_png, visualize
from .predictor import Predictor


def _label_space(predictor: Predictor) -> LabelSpace:
    if predictor.label_space is not None:
        return predictor.label_space
    count = predictor.model.num_classes
    return LabelSpace([f"class_{i}" for i in range(count)], [True] * count)


def predict_files(
    images: Sequence[str | Path], checkpoint: str | None = None, onnx: str | None = None, task: str = "panoptic",
    out_dir: str | Path = "predictions", device: str = "cpu", min_size: int | None = None,
    max_size: int | None = None, precision: str = "fp32", coco_json: str | Path | None = None,
) -> list[Path]:
    """Write per image ``<stem>_<task>.png`` (overlay), the standard results files of ``task`` (see
    ``evaluation.results_files``) and ``summary.json`` (readable: class names, scores, areas). Image ids are the
    file stem (an int when numeric, as COCO names its files) or come from ``coco_json``."""
    if onnx is not None:
        from ..interop.onnx import OnnxModel

        model: Any = OnnxModel(onnx)
    elif checkpoint is not None:
        model = checkpoint
    else:
        raise ValueError("give --checkpoint or --onnx")
    image_ids = _coco_image_ids(coco_json) if coco_json else None
    paths = [Path(path) for path in images]
    ids = [_image_id(path, image_ids, coco_json) for path in paths]
    predictor = Predictor(model, task=task, device=device, min_size=min_size, max_size=max_size, precision=precision)
    label_space = _label_space(predictor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ResultsWriter(out, label_space, (task,))
    written: list[Path] = []
    summary: list[dict[str, Any]] = []
    for path, image_id in zip(paths, ids):
        image = read_image(path)
        result = predictor(image)
        stem = path.stem
        written.append(save_png(visualize(image, result, task, label_space), out / f"{stem}_{task}.png"))
        writer.add(image_id, stem, {task: result})
        record: dict[str, Any] = {"file_name": str(path), "image_id": image_id, "height": int(image.shape[1]),
                                  "width": int(image.shape[2])}
        if task == "semantic":
            written.append(out / "semantic" / f"{stem}.png")
            record["classes"] = sorted({label_space.names[i] for i in result.unique().tolist()})
        elif task == "panoptic":
            written.append(out / "panoptic" / f"{stem}.png")
            record["segments"] = [
                {**_plain(info), "category_id": label_space.to_dataset(int(info["category_id"])),
                 "category": label_space.names[int(info["category_id"])]}
                for info in result[1]
            ]
        else:
            record["instances"] = [
                {"category_id": label_space.to_dataset(int(label)), "category": label_space.names[int(label)],
                 "score": float(score), "bbox_xyxy": [float(v) for v in box]}
                for label, score, box in zip(result["labels"], result["scores"], result["boxes"])
            ]
        summary.append(record)
    written.extend(path for path in writer.close().values() if path.is_file())
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps({"task": task, "precision": precision, "images": summary}, indent=1))
    written.append(summary_path)
    return written


def _coco_image_ids(coco_json: str | Path) -> dict[str, Any]:
    """``file name -> image id`` from a COCO JSON's ``images`` (basenames, as a user passes image files)."""
    from ..data.formats.coco import load_coco_json

    data = load_coco_json(Path(coco_json))
    return {Path(image["file_name"]).name: image["id"] for image in data.get("images", [])}


def _image_id(path: Path, image_ids: dict[str, Any] | None, coco_json: Any) -> Any:
    if image_ids is not None:
        if path.name not in image_ids:
            raise ValueError(f"{coco_json}: no image with file name {path.name!r} (for {path})")
        return image_ids[path.name]
    return int(path.stem) if path.stem.isdigit() else path.stem


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}
