"""Overlays of semantic, instance and panoptic results (and of ground truth) drawn with PIL.

Each segment is blended with its class colour, outlined with a 1-pixel border in that colour and labelled
with the class name (and score for predictions); a legend lists the classes shown. Labels never overlap
(``label_layout``: inside their segment, else outside with a leader line, else left off and listed in the layout
that ``return_layout=True`` returns). A small image is drawn at an integer multiple of its size whose long side is
about ``display_size`` pixels (default 512), so that the text stays sharp where the picture is shown larger. Colours are stable per
class: they come from ``label_space.colors`` (LabelSpace's deterministic defaults when a duck-typed
object has none).
``label_space`` is anything with ``names`` (and optionally ``colors`` and ``ignore_index``), such as
``mask2former.data.label_space.LabelSpace``.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data.label_space import default_colors
from .label_layout import LabelLayout, layout_labels

__all__ = [
    "class_color",
    "to_pil_image",
    "draw_semantic",
    "draw_instances",
    "draw_panoptic",
    "draw_sample",
    "visualize",
    "side_by_side",
    "compare",
    "save_png",
    "LabelLayout",
    "DISPLAY_SIZE",
]

Color = tuple[int, int, int]
_TEXT_COLOR: Color = (255, 255, 255)
_TEXT_BACKGROUND: Color = (0, 0, 0)
_PANEL_BACKGROUND: Color = (255, 255, 255)
DISPLAY_SIZE = 512  # overlays of smaller images are drawn at an integer multiple of their size reaching about this


def class_color(label_space: Any, class_id: int) -> Color:
    """The colour of a contiguous class id: ``label_space.colors[class_id]`` if set, else LabelSpace's default."""
    num_classes = len(label_space.names)
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} outside [0, {num_classes})")
    colors = getattr(label_space, "colors", None)
    if colors:
        return tuple(int(c) for c in colors[class_id])  # type: ignore[return-value]
    return default_colors(num_classes)[class_id]


def to_pil_image(image: Any) -> Image.Image:
    """RGB PIL image from a path, PIL image, uint8/float [3, H, W] tensor (0-255) or [H, W, 3] array."""
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
        array = image.detach().cpu()
        if array.dtype != torch.uint8:
            array = array.float().clamp(0, 255).round().to(torch.uint8)
        array = array.expand(3, -1, -1)
        return Image.fromarray(array.permute(1, 2, 0).numpy())
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be [H, W, 3], got {array.shape}")
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


_fonts = threading.local()


def _font(size: int = 12) -> ImageFont.ImageFont:
    # One per thread and size: building it decodes the font each time, and a FreeType face must not be shared by
    # threads. Pillow's built-in scalable font (Aileron) needs no font file on the system.
    cache = getattr(_fonts, "by_size", None)
    if cache is None:
        cache = _fonts.by_size = {}
    if size not in cache:
        cache[size] = ImageFont.load_default(size=size)
    return cache[size]


def display_scale(width: int, height: int, display_size: int | None = DISPLAY_SIZE) -> int:
    """The integer factor an overlay of a ``width x height`` image is drawn at (1: the image's own size)."""
    if not display_size:
        return 1
    return max(1, round(display_size / max(width, height, 1)))


def font_size(canvas_width: int, canvas_height: int) -> int:
    """Label text height in pixels for a canvas: 12 up to ~768 px, then growing with the picture."""
    return max(12, round(math.sqrt(canvas_width * canvas_height) / 64))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (image edges count as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _label_sizes(draw: ImageDraw.ImageDraw, texts: Sequence[str | None], font: Any) -> list[tuple[int, int]]:
    """(width, height) of each label's box: the text's ink box plus padding (0 x 0 without text)."""
    sizes = []
    pad = max(2, font.size // 6)
    for text in texts:
        if not text:
            sizes.append((0, 0))
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    return sizes


def _draw_labels(draw: ImageDraw.ImageDraw, layout: LabelLayout, colors: Sequence[Color], font: Any) -> None:
    """Leader lines first (under every label), then each label: a dark box outlined in its class colour."""
    pad = max(2, font.size // 6)
    for label in layout.placed:
        if label.leader:
            end = label.leader_end()
            draw.line([label.anchor, end], fill=_TEXT_BACKGROUND, width=3)
            draw.line([label.anchor, end], fill=_TEXT_COLOR, width=1)
            x, y = label.anchor
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_TEXT_COLOR, outline=_TEXT_BACKGROUND)
    for label in layout.placed:
        x0, y0, x1, y1 = label.box
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_TEXT_BACKGROUND, outline=colors[label.index])
        left, top, _, _ = draw.textbbox((0, 0), label.text, font=font)
        draw.text((x0 + pad - left, y0 + pad - top), label.text, fill=_TEXT_COLOR, font=font)


def _overlay(
    image: Image.Image,
    segments: Sequence[tuple[np.ndarray, Color, str | None]],
    alpha: float,
    legend: Sequence[tuple[str, Color]] | None,
    segment_index: np.ndarray | None = None,
    display_size: int | None = DISPLAY_SIZE,
) -> tuple[Image.Image, LabelLayout]:
    """Blend each (mask, colour, label) into the image, outline it, label it, then add the legend; returns the
    picture and where its labels went.

    ``segment_index`` ([H, W], k + 1 where segment k is, 0 elsewhere) says the masks are disjoint: blending and
    outlines then take one pass over the image instead of one per segment (same pixels). The picture is drawn at
    ``display_scale`` times the image's size: the photo resized bilinearly, the masks repeated pixel by pixel."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scale = display_scale(image.width, image.height, display_size)

    def up(mask: np.ndarray) -> np.ndarray:
        return mask if scale == 1 else np.repeat(np.repeat(mask, scale, 0), scale, 1)

    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    base = np.asarray(image, dtype=np.float32).copy()
    if segment_index is None:
        segments_up = [(up(mask), color, text) for mask, color, text in segments]
        for mask, color, _ in segments_up:
            base[mask] = (1.0 - alpha) * base[mask] + alpha * np.asarray(color, dtype=np.float32)
        for mask, color, _ in segments_up:
            base[_boundary(mask)] = color
    else:
        segment_index = up(segment_index)
        colors = np.asarray([(0, 0, 0)] + [color for _, color, _ in segments], dtype=np.float32)
        painted = segment_index > 0
        blended = ((1.0 - alpha) * base + alpha * colors[segment_index]).astype(np.float32)
        base = np.where(painted[..., None], blended, base)
        # A segment's outline: its pixels with a 4-neighbour in another segment, void or outside the image.
        padded = np.pad(segment_index, 1, constant_values=-1)
        inside = ((padded[:-2, 1:-1] == segment_index) & (padded[2:, 1:-1] == segment_index)
                  & (padded[1:-1, :-2] == segment_index) & (padded[1:-1, 2:] == segment_index))
        outline = painted & ~inside
        base[outline] = colors[segment_index[outline]]
    canvas = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size(*canvas.size))
    texts = [text for _, _, text in segments]
    layout = layout_labels([mask for mask, _, _ in segments], texts, _label_sizes(draw, texts, font), scale,
                           canvas.size)
    _draw_labels(draw, layout, [color for _, color, _ in segments], font)
    if legend:
        canvas = _with_legend(canvas, legend, font)
    return canvas, layout


def _with_legend(canvas: Image.Image, entries: Sequence[tuple[str, Color]], font: Any) -> Image.Image:
    """A white panel on the right with one colour swatch and name per entry."""
    probe = ImageDraw.Draw(canvas)
    line_h = max(probe.textbbox((0, 0), name, font=font)[3] for name, _ in entries) + 6
    text_w = max(probe.textlength(name, font=font) for name, _ in entries)
    swatch = line_h - 4
    panel_w = int(8 + swatch + 6 + text_w + 8)
    panel_h = max(canvas.height, 8 + line_h * len(entries))
    result = Image.new("RGB", (canvas.width + panel_w, panel_h), _PANEL_BACKGROUND)
    result.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(result)
    for row, (name, color) in enumerate(entries):
        y = 4 + row * line_h
        x = canvas.width + 8
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + 6, y), name, fill=(0, 0, 0), font=font)
    return result


def _legend_entries(label_space: Any, class_ids: Sequence[int]) -> list[tuple[str, Color]]:
    return [(label_space.names[c], class_color(label_space, c)) for c in sorted(set(class_ids))]


def _check_size(array: np.ndarray, image: Image.Image, what: str) -> None:
    if array.shape[-2:] != (image.height, image.width):
        raise ValueError(f"{what} size {tuple(array.shape[-2:])} != image size {(image.height, image.width)}")


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy() if isinstance(tensor, Tensor) else np.asarray(tensor)


def _result(drawn: tuple[Image.Image, LabelLayout], return_layout: bool) -> Any:
    return drawn if return_layout else drawn[0]


def draw_semantic(
    image: Any, semantic: Any, label_space: Any, alpha: float = 0.5, legend: bool = True,
    display_size: int | None = DISPLAY_SIZE, return_layout: bool = False,
) -> Image.Image:
    """Overlay a class-id map [H, W] (or class scores [K, H, W]); ``ignore_index`` pixels stay uncoloured.
    ``return_layout``: return ``(picture, LabelLayout)``, the layout saying where each label went (the same
    keywords in every ``draw_*`` function)."""
    picture = to_pil_image(image)
    class_map = _numpy(semantic)
    if class_map.ndim == 3:
        class_map = class_map.argmax(0)
    _check_size(class_map, picture, "semantic map")
    ignore_index = getattr(label_space, "ignore_index", 255)
    num_classes = len(label_space.names)
    present = [int(c) for c in np.unique(class_map) if c != ignore_index]
    for class_id in present:
        if not 0 <= class_id < num_classes:
            raise ValueError(f"semantic map has class id {class_id} outside [0, {num_classes}) and != {ignore_index}")
    segments = [
        (class_map == c, class_color(label_space, c), label_space.names[c]) for c in present
    ]
    index_of_class = np.zeros(max(int(class_map.max(initial=0)), 0) + 1, dtype=np.int64)
    index_of_class[present] = np.arange(1, len(present) + 1)
    return _result(_overlay(picture, segments, alpha, _legend_entries(label_space, present) if legend else None,
                            segment_index=np.where(class_map >= 0, index_of_class[np.maximum(class_map, 0)], 0),
                            display_size=display_size), return_layout)


def draw_instances(
    image: Any,
    instances: Mapping[str, Any],
    label_space: Any,
    score_threshold: float = 0.5,
    alpha: float = 0.5,
    legend: bool = True,
    display_size: int | None = DISPLAY_SIZE,
    return_layout: bool = False,
) -> Image.Image:
    """Overlay instances (``masks``, ``labels``, optional ``scores``); those scoring below the threshold are not drawn.

    Lower-scoring instances are drawn first so the most confident ones end up on top.
    """
    picture = to_pil_image(image)
    masks = _numpy(instances["masks"]).astype(bool)
    labels = _numpy(instances["labels"]).astype(np.int64).reshape(-1)
    scores = instances.get("scores")
    scores = None if scores is None else _numpy(scores).astype(np.float64).reshape(-1)
    if masks.ndim != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(f"instance masks {masks.shape} do not match {labels.shape[0]} labels")
    if masks.shape[0]:
        _check_size(masks, picture, "instance masks")
    order = np.arange(labels.shape[0]) if scores is None else np.argsort(scores, kind="stable")
    segments, shown = [], []
    for index in order:
        if scores is not None and scores[index] < score_threshold:
            continue
        label = int(labels[index])
        text = label_space.names[label] if scores is None else f"{label_space.names[label]} {scores[index]:.2f}"
        segments.append((masks[index], class_color(label_space, label), text))
        shown.append(label)
    return _result(_overlay(picture, segments, alpha, _legend_entries(label_space, shown) if legend and shown else None,
                            display_size=display_size), return_layout)


def draw_panoptic(
    image: Any,
    segment_map: Any,
    segments_info: Sequence[Mapping[str, Any]],
    label_space: Any,
    alpha: float = 0.5,
    legend: bool = True,
    display_size: int | None = DISPLAY_SIZE,
    return_layout: bool = False,
) -> Image.Image:
    """Overlay a panoptic result: ``segment_map`` [H, W] (0 = void) with ``segments_info`` entries."""
    picture = to_pil_image(image)
    ids = _numpy(segment_map)
    _check_size(ids, picture, "segment map")
    segments, shown = [], []
    index_of_id = np.zeros(max(int(ids.max(initial=0)), 0) + 1, dtype=np.int64)
    for info in segments_info:
        label = int(info["category_id"])
        name = label_space.names[label]
        text = f"{name} {info['score']:.2f}" if "score" in info else name
        segments.append((ids == int(info["id"]), class_color(label_space, label), text))
        shown.append(label)
        if 0 <= int(info["id"]) < len(index_of_id):
            index_of_id[int(info["id"])] = len(segments)
    return _result(_overlay(picture, segments, alpha, _legend_entries(label_space, shown) if legend and shown else None,
                            segment_index=np.where(ids >= 0, index_of_id[np.maximum(ids, 0)], 0),
                            display_size=display_size), return_layout)


def draw_sample(sample: Mapping[str, Any], task: str, label_space: Any, image: Any = None, **kwargs) -> Image.Image:
    """Draw a sample's ground truth (a ``data.contracts.Sample``) for ``task``; crowd segments are labelled."""
    picture = sample["image"] if image is None else image
    if task == "semantic":
        return draw_semantic(picture, sample["semantic"], label_space, **kwargs)
    labels = _numpy(sample["labels"]).reshape(-1)
    crowd = _numpy(sample.get("iscrowd", np.zeros_like(labels, dtype=bool))).reshape(-1).astype(bool)
    masks = _numpy(sample["masks"]).astype(bool)
    if task == "instance":
        # instances are the thing segments; crowd regions are drawn and labelled as such
        pil = to_pil_image(picture)
        if masks.shape[0]:
            _check_size(masks, pil, "sample masks")
        is_thing = getattr(label_space, "is_thing", None)
        shown = [i for i in range(labels.shape[0]) if is_thing is None or is_thing[int(labels[i])]]
        segments = [
            (masks[i], class_color(label_space, int(labels[i])), label_space.names[int(labels[i])] + (" (crowd)" if crowd[i] else ""))
            for i in shown
        ]
        legend = kwargs.get("legend", True) and bool(shown)
        entries = _legend_entries(label_space, [int(labels[i]) for i in shown]) if legend else None
        return _result(_overlay(pil, segments, kwargs.get("alpha", 0.5), entries,
                                display_size=kwargs.get("display_size", DISPLAY_SIZE)),
                       kwargs.get("return_layout", False))
    if task == "panoptic":
        segment_map = np.zeros(masks.shape[-2:], dtype=np.int32)
        infos = []
        for i in range(labels.shape[0]):
            segment_map[masks[i]] = i + 1
            infos.append({"id": i + 1, "category_id": int(labels[i])})
        return draw_panoptic(picture, segment_map, infos, label_space, **kwargs)
    raise ValueError(f"task must be 'semantic', 'instance' or 'panoptic', got {task!r}")


def visualize(image: Any, result: Any, task: str, label_space: Any, **kwargs) -> Image.Image:
    """Draw a post-processed result of ``task`` (the Predictor's / ``batch_postprocess``'s output) on the image."""
    if task == "semantic":
        return draw_semantic(image, result, label_space, **kwargs)
    if task == "instance":
        return draw_instances(image, result, label_space, **kwargs)
    if task == "panoptic":
        segment_map, segments_info = result
        return draw_panoptic(image, segment_map, segments_info, label_space, **kwargs)
    raise ValueError(f"task must be 'semantic', 'instance' or 'panoptic', got {task!r}")


def side_by_side(
    left: Image.Image, right: Image.Image, titles: Sequence[str] | None = ("ground truth", "prediction"), gap: int = 8
) -> Image.Image:
    """Two images next to each other on a white canvas, with optional titles above them."""
    font = _font(font_size(*left.size))
    title_h = 0
    if titles:
        probe = ImageDraw.Draw(left)
        title_h = max(probe.textbbox((0, 0), t, font=font)[3] for t in titles) + 6
    width = left.width + gap + right.width
    height = title_h + max(left.height, right.height)
    canvas = Image.new("RGB", (width, height), _PANEL_BACKGROUND)
    canvas.paste(left, (0, title_h))
    canvas.paste(right, (left.width + gap, title_h))
    if titles:
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 2), titles[0], fill=(0, 0, 0), font=font)
        draw.text((left.width + gap + 2, 2), titles[1], fill=(0, 0, 0), font=font)
    return canvas


def compare(
    sample: Mapping[str, Any],
    result: Any,
    task: str,
    label_space: Any,
    path: str | Path | None = None,
    image: Any = None,
    **kwargs,
) -> Image.Image:
    """Ground truth (left) vs prediction (right) for one sample; written as PNG when ``path`` is given."""
    picture = sample["image"] if image is None else image
    kwargs.setdefault("legend", True)
    truth = draw_sample(sample, task, label_space, image=picture, **{k: v for k, v in kwargs.items() if k in ("alpha", "legend", "display_size")})
    prediction = visualize(picture, result, task, label_space, **kwargs)
    combined = side_by_side(truth, prediction)
    if path is not None:
        save_png(combined, path)
    return combined


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG (parent folders are created)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: visualisations are written as .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
