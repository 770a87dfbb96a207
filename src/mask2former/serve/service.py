"""What the server does, apart from HTTP: decode an upload, describe a prediction as JSON, draw its overlay.

Nothing here knows about the web framework, so the same checks and answers hold for any front end.
"""

from __future__ import annotations

import base64
import io
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import TASKS
from ..data.image_io import one_line, to_rgb_array
from ..inference.predictor import Predictor
from ..evaluation.results_files import ResultsWriter
from ..viz import class_color, display_scale, font_size, visualize

__all__ = ["ApiError", "SegmentationService", "decode_image", "parse_options", "parse_page_options",
           "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Inference runs at the uploaded size (as `mask2former predict` does without --min-size), so memory and time grow
# with the pixel count: 4 MP keeps a CPU demo responsive.
DEFAULT_MAX_PIXELS = 2048 * 2048


class ApiError(Exception):
    """An error answered as JSON ``{"error": message, "status": status}`` with that HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = " ".join(message.split())
        self.headers = dict(headers or {})


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Upload bytes -> ``uint8 [3, H, W]`` RGB (EXIF-oriented); ApiError 400 for broken bytes, 413 for too many pixels.

    The pixel count is checked from the header, before the pixels are decoded, so a decompression bomb costs nothing.
    """
    if not data:
        raise ApiError(400, "empty upload: no image bytes received")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(error, max_pixels) from None
    except UnidentifiedImageError:
        raise ApiError(400, "cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ApiError(400, f"cannot decode image: {one_line(error)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ApiError(400, f"image has no pixels ({width}x{height})")
    try:
        image.load()
        array = to_rgb_array(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(error, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ApiError(400, f"truncated or corrupt image: {one_line(error)}") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _too_many_pixels(error: Exception, max_pixels: int) -> ApiError:
    """413 naming the server's limit for an image PIL refused as a decompression bomb (its own, far higher limit):
    the client should learn the limit that applies to it, whichever check saw the image first."""
    counts = [int(number) for number in re.findall(r"\((\d+) pixels\)", str(error))]
    size = f"{counts[0]} pixels" if counts else "too many pixels"
    return ApiError(413, f"image has {size}; the limit is {max_pixels} pixels")


def parse_options(options: dict[str, str]) -> tuple[str, float, bool, bool]:
    """``(task, score_threshold, overlay, legend)`` from query/form fields; ApiError 400 for bad values."""
    task = options.get("task", "panoptic")
    if task not in TASKS:
        raise ApiError(400, f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    try:
        score_threshold = float(options.get("score_threshold", 0.5))
    except ValueError:
        raise ApiError(400, f"score_threshold must be a number, got {options['score_threshold']!r}") from None
    if not 0.0 <= score_threshold <= 1.0:
        raise ApiError(400, f"score_threshold must be in [0, 1], got {score_threshold}")
    overlay, legend = (options.get(flag, "1").lower() not in ("0", "false", "no") for flag in ("overlay", "legend"))
    return task, score_threshold, overlay, legend


def parse_page_options(options: dict[str, str]) -> tuple[bool, str | None]:
    """``(layers, record_name)``: ``layers=1`` adds what the page draws itself (the region map and the label
    layout); ``record=NAME`` adds the record ``mask2former predict`` writes for a file of that name."""
    layers = options.get("layers", "0").lower() not in ("0", "false", "no")
    name = options.get("record")
    if name is not None:
        name = Path(name.replace("\\", "/")).name  # a file name only, whatever the browser sends
        if not name or len(name) > 255:
            raise ApiError(400, "record must be the uploaded file's name (1 to 255 characters)")
    return layers, name


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # 3-4x faster than the default level, ~7 % larger
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _labels(layout: Any, rows: list[int], width: int, height: int) -> dict[str, Any]:
    """The overlay's label layout for the page (canvas pixels: the image times ``scale``), labels named by row."""
    scale = display_scale(width, height)
    canvas = [width * scale, height * scale]
    return {"canvas": canvas, "scale": scale, "font_px": font_size(*canvas),
            "placed": [{"row": rows[label.index], "text": label.text, "box": list(label.box),
                        "anchor": list(label.anchor), "leader": label.leader} for label in layout.placed],
            "left_off": [{"row": rows[index], "text": text} for index, text in layout.left_off]}


class SegmentationService:
    """The server's state: one predictor shared by all requests, its label space and the upload limits."""

    def __init__(self, predictor: Predictor, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if max_upload_bytes <= 0 or max_pixels <= 0:
            raise ValueError(f"max_upload_bytes and max_pixels must be > 0, got {max_upload_bytes}, {max_pixels}")
        self.predictor = predictor
        self.label_space = predictor.label_space
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        # For callers outside the server's batching queue: the model is shared, one forward pass at a time.
        self._inference_lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "num_classes": self.label_space.num_classes,
            "tasks": list(TASKS),
            "device": str(self.predictor.device),
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels},
        }

    def _class_entry(self, label: int) -> dict[str, Any]:
        space = self.label_space
        return {"label": label, "category_id": space.to_dataset(label), "category": space.names[label],
                "isthing": space.is_thing[label], "color": list(class_color(space, label))}

    def classes(self) -> dict[str, Any]:
        # COCO-categories style: "name" here, "category" in the per-segment entries of /api/predict
        entries = [self._class_entry(label) for label in range(self.label_space.num_classes)]
        return {"classes": [{"name" if key == "category" else key: value for key, value in entry.items()}
                            for entry in entries]}

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_image(data, self.max_pixels)

    def run_model(self, image: torch.Tensor, task: str) -> Any:
        """The predictor's result for one decoded image (exactly what ``Predictor(task=task)(image)`` gives)."""
        with self._inference_lock:
            return self.predictor.predict_tasks([image], (task,))[0][task]

    def describe(self, image: torch.Tensor, result: Any, task: str, score_threshold: float = 0.5,
                 overlay: bool = True, legend: bool = True, layers: bool = False,
                 record_name: str | None = None) -> dict[str, Any]:
        """The JSON answer for one prediction: segments/instances/classes, legend and (optionally) the overlay PNG,
        the page's layers (``regions_png``, ``labels``) and predict's record of the image."""
        response: dict[str, Any] = {"task": task, "width": int(image.shape[2]), "height": int(image.shape[1])}
        if task == "panoptic":
            _, segments_info = result
            response["segments"] = [
                {"id": int(info["id"]), **self._class_entry(int(info["category_id"])),
                 "isthing": bool(info["isthing"]), "score": float(info["score"]), "area": int(info["area"])}
                for info in segments_info
            ]
            shown = [s["label"] for s in response["segments"]]
        elif task == "instance":
            keep = [i for i, score in enumerate(result["scores"].tolist()) if score >= score_threshold]
            areas = result["masks"].flatten(1).sum(1).tolist() if keep else []
            response["score_threshold"] = score_threshold
            response["instances"] = [
                {**self._class_entry(int(result["labels"][i])), "score": float(result["scores"][i]),
                 "box": [float(v) for v in result["boxes"][i].tolist()], "area": int(areas[i])}
                for i in keep
            ]
            shown = [s["label"] for s in response["instances"]]
            # rows in the order the overlay draws them (lowest score first, so the most confident ends on top)
            drawn_rows = sorted(range(len(keep)), key=lambda row: float(result["scores"][keep[row]]))
        else:
            counts = torch.bincount(result.flatten(), minlength=self.label_space.num_classes).tolist()
            total = int(result.numel())
            response["classes"] = [
                {**self._class_entry(label), "area": count, "fraction": count / total}
                for label, count in enumerate(counts) if count
            ]
            shown = [s["label"] for s in response["classes"]]
        response["legend"] = [self._class_entry(label) for label in sorted(set(shown))]
        if overlay or layers:
            options = {"score_threshold": score_threshold} if task == "instance" else {}
            drawn, layout = visualize(image, result, task, self.label_space, legend=legend, return_layout=True,
                                      **options)
            if overlay:
                response["overlay_png"] = _png_data_url(drawn)
            if layers:
                rows = drawn_rows if task == "instance" else list(range(len(shown)))
                response["regions_png"] = _png_data_url(self._regions(result, task, response, rows))
                response["labels"] = _labels(layout, rows, int(image.shape[2]), int(image.shape[1]))
        if record_name is not None:
            response["record"] = self.record(image, result, task, record_name)
        return response

    def _regions(self, result: Any, task: str, response: dict[str, Any], rows: list[int]) -> Image.Image:
        """Which table row each pixel shows (row + 1 in red + 256 x green, 0: none), for the page's hover: the
        instance on top where instances overlap, as the overlay draws them."""
        if task == "panoptic":
            segment_map = result[0].cpu().numpy().astype(np.int64)
            row_of = np.zeros(int(segment_map.max(initial=0)) + 1, dtype=np.int64)
            for row, segment in enumerate(response["segments"]):
                row_of[segment["id"]] = row + 1
            index = row_of[np.clip(segment_map, 0, None)]
        elif task == "semantic":
            class_map = result.cpu().numpy().astype(np.int64)
            row_of = np.zeros(self.label_space.num_classes + 1, dtype=np.int64)
            for row, entry in enumerate(response["classes"]):
                row_of[entry["label"]] = row + 1
            index = row_of[np.clip(class_map, 0, self.label_space.num_classes)]
        else:
            keep = [i for i, score in enumerate(result["scores"].tolist()) if score >= response["score_threshold"]]
            masks = result["masks"].cpu().numpy().astype(bool)
            index = np.zeros(masks.shape[-2:], dtype=np.int64)
            for row in rows:
                index[masks[keep[row]]] = row + 1
        rgb = np.stack([index % 256, index // 256 % 256, np.zeros_like(index)], -1).astype(np.uint8)
        return Image.fromarray(rgb)

    def record(self, image: torch.Tensor, result: Any, task: str, file_name: str) -> dict[str, Any]:
        """What ``mask2former predict`` records for a file ``file_name`` holding this image: its ``summary.json``
        entry and its results entries (the same code writes both; result PNGs go to a folder thrown away)."""
        from ..apps.predict_files import image_id_of, summary_entry

        image_id = image_id_of(Path(file_name))
        with tempfile.TemporaryDirectory() as scratch:
            added = ResultsWriter(scratch, self.label_space, (task,)).add(image_id, Path(file_name).stem,
                                                                          {task: result})
        return {"summary": summary_entry(task, self.label_space, file_name, image_id, image, result),
                "results": added.get(task)}

    def predict(self, data: bytes, task: str = "panoptic", score_threshold: float = 0.5, overlay: bool = True,
                legend: bool = True) -> dict[str, Any]:
        """Decode, run, describe and (optionally) draw one upload, without the server (for scripts)."""
        task, score_threshold, overlay, legend = parse_options(
            {"task": task, "score_threshold": str(score_threshold), "overlay": str(int(overlay)),
             "legend": str(int(legend))})
        image = self.decode(data)
        start = time.perf_counter()
        result = self.run_model(image, task)
        inference_ms = (time.perf_counter() - start) * 1000.0
        return {**self.describe(image, result, task, score_threshold, overlay, legend), "inference_ms": inference_ms,
                "batch_size": 1}
