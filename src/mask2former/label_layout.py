"""Where the labels of an overlay go, so that no two of them overlap and each sits on the picture.

Every segment gets a ranked list of candidate boxes, tried in this order:

1. inside the segment: centred on points of its connected components, the largest component first; in each
   component, points far from its border (the distance transform's maxima, spread apart), the box lying most on
   the segment first;
2. outside it: boxes on rings of growing radius around its best inside point, joined to that point by a leader
   line that crosses no placed label.

All segments try their inside candidates first (smallest segment first: a small segment has few places, a large
one many), then the ones still without a place try the outside rings. A box is taken when it lies on the canvas
and keeps a one-pixel gap to every box already placed; a label with no such candidate is left off the picture and
listed in ``LabelLayout.left_off`` (the legend and the tables still name its class).

Masks are at the image's size; boxes are in canvas pixels, the canvas being the image scaled by an integer
``scale`` (overlays are drawn larger than small images so that their text stays sharp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["PlacedLabel", "LabelLayout", "layout_labels", "boxes_intersect"]

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in canvas pixels; x1, y1 exclusive

_GAP = 1  # pixels kept free between two labels
_COMPONENTS = 3  # components of a segment that get candidates (largest first)
_POINTS_PER_COMPONENT = 10
_RINGS = (0.5, 1.5, 3.0, 5.0, 8.0)  # leader ring radii, in label heights beyond the box's half extent
_DIRECTIONS = 16
_MAX_EDT_SIDE = 256  # components and depths are found on a crop subsampled to at most this long a side


@dataclass(frozen=True)
class PlacedLabel:
    """A label on the canvas: ``index`` of its segment, its box, the point of the segment it names and whether a
    leader line joins them (the box is outside the segment)."""

    index: int
    text: str
    box: Box
    anchor: tuple[int, int]
    leader: bool

    def leader_end(self) -> tuple[int, int]:
        """The point of the box's border nearest to the anchor (where a leader line meets the box)."""
        x0, y0, x1, y1 = self.box
        return min(max(self.anchor[0], x0), x1 - 1), min(max(self.anchor[1], y0), y1 - 1)


@dataclass
class LabelLayout:
    """The placed labels and those left off (``(segment index, text)``: no free place on the picture)."""

    placed: list[PlacedLabel] = field(default_factory=list)
    left_off: list[tuple[int, str]] = field(default_factory=list)


def boxes_intersect(a: Box, b: Box, gap: int = 0) -> bool:
    """Whether two boxes (exclusive right/bottom) share a pixel, or come closer than ``gap`` pixels."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _inside_points(mask: np.ndarray, spacing: float, offset: tuple[int, int]) -> list[list[tuple[float, float]]]:
    """Candidate (x, y) points in image pixels, a list per component (largest first): its deepest points, spread
    apart. ``mask`` is the segment's bounding-box crop, at ``offset`` = (x, y) in the image. A large crop is looked
    at every ``stride`` pixels (components and depths of a subsampled mask: candidates need not be exact)."""
    stride = max(1, math.ceil(max(mask.shape) / _MAX_EDT_SIDE))
    small = mask[::stride, ::stride]
    if stride > 1 and not small.any():
        stride, small = 1, mask  # a thin segment the subsampling misses
    components, count = ndimage.label(small, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    slices = ndimage.find_objects(components)
    cell = max(spacing / stride, 1.0)
    points: list[list[tuple[float, float]]] = []
    for component in np.argsort(-sizes, kind="stable")[:_COMPONENTS]:
        rows, cols = slices[component]
        crop = np.pad(components[rows, cols] == component + 1, 1)  # the crop's edge is the component's outside
        depth = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
        ys, xs = np.nonzero(depth)
        order = np.argsort(-depth[ys, xs], kind="stable")
        # spread apart: the deepest point of each grid cell of side ``spacing``, the deepest cells first
        cells = (ys[order] // cell).astype(np.int64) * (1 << 20) + (xs[order] // cell).astype(np.int64)
        _, first = np.unique(cells, return_index=True)
        picked = order[np.sort(first)[:_POINTS_PER_COMPONENT]]
        # pixel centres, in image coordinates
        points.append([(offset[0] + (cols.start + xs[k]) * stride + 0.5, offset[1] + (rows.start + ys[k]) * stride + 0.5)
                       for k in picked])
    return points


def _coverage(crop: np.ndarray, box: Box, scale: int, offset: tuple[int, int]) -> float:
    """The fraction of ``box`` (canvas pixels) on the mask whose bounding-box crop at ``offset`` is ``crop``."""
    x0, y0 = box[0] // scale, box[1] // scale
    x1, y1 = -(-box[2] // scale), -(-box[3] // scale)
    inside = crop[max(y0 - offset[1], 0):max(y1 - offset[1], 0), max(x0 - offset[0], 0):max(x1 - offset[0], 0)]
    return float(np.count_nonzero(inside)) / max((x1 - x0) * (y1 - y0), 1)


def _box_at(center_x: float, center_y: float, size: tuple[int, int], canvas: tuple[int, int]) -> Box:
    """A box of ``size`` centred at the point, shifted onto the canvas (it still covers the point)."""
    width, height = size
    x0 = min(max(int(round(center_x - width / 2)), 0), canvas[0] - width)
    y0 = min(max(int(round(center_y - height / 2)), 0), canvas[1] - height)
    return x0, y0, x0 + width, y0 + height


def _ring_boxes(anchor: tuple[int, int], size: tuple[int, int], canvas: tuple[int, int]) -> list[Box]:
    """Boxes around ``anchor`` on rings of growing radius, fully on the canvas (nearest ring first)."""
    width, height = size
    boxes = []
    for ring in _RINGS:
        for step in range(_DIRECTIONS):
            # up first, then the directions alternating around it: labels prefer to sit above their segment
            turn = (step + 1) // 2 * (1 if step % 2 else -1)
            angle = -math.pi / 2 + turn * 2 * math.pi / _DIRECTIONS
            dx, dy = math.cos(angle), math.sin(angle)
            # the box's half extent in this direction, so that the ring radius is the gap to its border
            reach = min(width / 2 / max(abs(dx), 1e-9), height / 2 / max(abs(dy), 1e-9)) + ring * height
            x0 = int(round(anchor[0] + dx * reach - width / 2))
            y0 = int(round(anchor[1] + dy * reach - height / 2))
            if 0 <= x0 and 0 <= y0 and x0 + width <= canvas[0] and y0 + height <= canvas[1]:
                boxes.append((x0, y0, x0 + width, y0 + height))
    return boxes


def _line_crosses(start: tuple[int, int], end: tuple[int, int], boxes: Sequence[Box]) -> bool:
    """Whether the segment start-end passes through any of ``boxes`` (sampled every pixel)."""
    if not boxes:
        return False
    steps = max(abs(end[0] - start[0]), abs(end[1] - start[1]), 1)
    t = np.linspace(0.0, 1.0, steps + 1)[:, None]
    x = start[0] + t * (end[0] - start[0])
    y = start[1] + t * (end[1] - start[1])
    b = np.asarray(boxes, dtype=np.float64)
    return bool(((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])).any())


def layout_labels(
    masks: Sequence[np.ndarray],
    texts: Sequence[str | None],
    sizes: Sequence[tuple[int, int]],
    scale: int,
    canvas: tuple[int, int],
) -> LabelLayout:
    """Place the label ``texts[i]`` (a box of ``sizes[i]`` = (width, height) canvas pixels) of each segment
    ``masks[i]`` (bool [H, W] at the image's size) on a ``canvas`` = (width, height) that is the image scaled by
    ``scale``. Segments without text or pixels get no label (and are not listed as left off)."""
    if not (len(masks) == len(texts) == len(sizes)):
        raise ValueError(f"{len(masks)} masks, {len(texts)} texts and {len(sizes)} sizes")
    wanted = [i for i, text in enumerate(texts) if text and masks[i].any()]
    areas = {i: int(masks[i].sum()) for i in wanted}
    order = sorted(wanted, key=lambda i: (areas[i], i))
    placed: dict[int, PlacedLabel] = {}
    taken: list[Box] = []
    leaders: list[tuple[tuple[int, int], tuple[int, int]]] = []
    anchors: dict[int, tuple[int, int]] = {}

    def free(box: Box) -> bool:
        # apart from every placed label, and off every leader line drawn so far
        return (all(not boxes_intersect(box, other, _GAP) for other in taken)
                and not any(_line_crosses(start, end, [box]) for start, end in leaders))

    for i in order:  # 1. inside each segment
        width, height = sizes[i]
        if width > canvas[0] or height > canvas[1]:
            continue
        spacing = max(height / scale / 2, 1.0)
        # the segment's bounding box: a small segment of a large image costs what its box does
        rows, cols = np.flatnonzero(masks[i].any(1)), np.flatnonzero(masks[i].any(0))
        crop = masks[i][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        offset = (int(cols[0]), int(rows[0]))
        candidates: list[tuple[Box, float, float]] = []
        components = _inside_points(crop, spacing, offset)
        for component in components:
            # in each component (largest first), the boxes most on the segment first, the deepest on ties
            boxes = [(_box_at(x * scale, y * scale, (width, height), canvas), x * scale, y * scale)
                     for x, y in component]
            candidates += sorted(boxes, key=lambda entry: -_coverage(crop, entry[0], scale, offset))
        deepest = components[0][0]  # of the largest component: where a leader line points
        anchors[i] = (int(deepest[0] * scale), int(deepest[1] * scale))
        for box, x, y in candidates:
            if free(box):
                placed[i] = PlacedLabel(i, str(texts[i]), box, (int(x), int(y)), leader=False)
                taken.append(box)
                break
    for i in order:  # 2. outside, with a leader line
        if i in placed or i not in anchors:
            continue
        for box in _ring_boxes(anchors[i], sizes[i], canvas):
            if not free(box):
                continue
            label = PlacedLabel(i, str(texts[i]), box, anchors[i], leader=True)
            if not _line_crosses(anchors[i], label.leader_end(), taken):
                placed[i] = label
                taken.append(box)
                leaders.append((anchors[i], label.leader_end()))
                break
    layout = LabelLayout()
    for i in wanted:
        if i in placed:
            layout.placed.append(placed[i])
        else:
            layout.left_off.append((i, str(texts[i])))
    return layout
