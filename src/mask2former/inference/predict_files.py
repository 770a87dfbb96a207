"""``mask2former predict``: run a checkpoint (or an exported ONNX model) on image files and write, per image, a PNG
overlay plus machine-readable results (COCO-panoptic PNG + JSON, COCO instance results with RLE, or an index PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..data.image_io import read_image
from ..data.label_space import LabelSpace
from ..evaluation.instance import encode_masks
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
    max_size: int | None = None, precision: str = "fp32",
) -> list[Path]:
    if onnx is not None:
        from ..interop.onnx import OnnxModel

        model: Any = OnnxModel(onnx)
    elif checkpoint is not None:
        model = checkpoint
    else:
        raise ValueError("give --checkpoint or --onnx")
    predictor = Predictor(model, task=task, device=device, min_size=min_size, max_size=max_size, precision=precision)
    label_space = _label_space(predictor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summary: list[dict[str, Any]] = []
    for path in images:
        path = Path(path)
        image = read_image(path)
        result = predictor(image)
        stem = path.stem
        written.append(save_png(visualize(image, result, task, label_space), out / f"{stem}_{task}.png"))
        record: dict[str, Any] = {"file_name": str(path), "height": int(image.shape[1]), "width": int(image.shape[2])}
        if task == "semantic":
            Image.fromarray(result.numpy().astype(np.uint8 if label_space.num_classes < 256 else np.uint16)).save(
                out / f"{stem}_semantic_ids.png"
            )
            written.append(out / f"{stem}_semantic_ids.png")
            record["classes"] = sorted({label_space.names[i] for i in result.unique().tolist()})
        elif task == "panoptic":
            segment_map, segments_info = result
            ids = segment_map.numpy().astype(np.uint32)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
            # COCO panoptic PNG (id = R + 256 G + 65536 B); "_ids" keeps it apart from the overlay.
            Image.fromarray(rgb).save(out / f"{stem}_panoptic_ids.png")
            written.append(out / f"{stem}_panoptic_ids.png")
            record["panoptic_png"] = f"{stem}_panoptic_ids.png"
            record["segments_info"] = [
                {**_plain(info), "category_id": label_space.to_dataset(int(info["category_id"])),
                 "category": label_space.names[int(info["category_id"])]}
                for info in segments_info
            ]
        else:
            # COCO results JSON stores RLE counts as text.
            rles = [{**rle, "counts": rle["counts"].decode("ascii")} for rle in encode_masks(result["masks"])]
            record["instances"] = [
                {"category_id": label_space.to_dataset(int(label)), "category": label_space.names[int(label)],
                 "score": float(score), "bbox_xyxy": [float(v) for v in box], "segmentation": rle}
                for label, score, box, rle in zip(result["labels"], result["scores"], result["boxes"], rles)
            ]
        summary.append(record)
    results_path = out / f"results_{task}.json"
    results_path.write_text(json.dumps(summary, indent=1))
    written.append(results_path)
    return written


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}
