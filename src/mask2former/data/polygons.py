"""Polygons <-> masks for the labelling-tool formats (labelme, YOLO).

Rasterising follows labelme's ``shape_to_mask``: ``PIL.ImageDraw`` ``polygon(fill=1, outline=1)``, with vertex
``(x, y)`` on the pixel whose column is x and row is y, so the outline's pixels count as inside.

Tracing (:func:`mask_to_polygons`) walks the outer boundary of each 8-connected component through the centres of its
border pixels (Moore-neighbour tracing) and keeps only the corners. Drawn back with the rasteriser above, such a
polygon gives the component exactly, except where the component has holes (a polygon cannot hold a hole; the
exporters repaint holes with later shapes, see :func:`paint_order`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# The 8 neighbours in clockwise order (image coordinates, y down), as (dy, dx), starting from west.
_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def rasterize(shapes: Sequence[tuple[str, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Union of ``(kind, points[N, 2] as x, y)`` shapes as a bool [H, W] mask; kind is ``polygon``,
    ``rectangle`` (two corners) or ``circle`` (centre and a point on the circle), drawn as labelme draws them."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, points in shapes:
        xy = [(float(x), float(y)) for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2)]
        if kind == "polygon":
            draw.polygon(xy, fill=1, outline=1)
        elif kind == "rectangle":
            (x0, y0), (x1, y1) = xy
            # labelme passes the two clicked corners as they are; Pillow needs them ordered.
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
        elif kind == "circle":
            (cx, cy), (px, py) = xy
            radius = float(np.hypot(cx - px, cy - py))
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1, outline=1)
        else:
            raise ValueError(f"rasterize: unknown shape kind {kind!r}")
    return np.asarray(canvas, dtype=bool)


def _trace(mask: np.ndarray, start: tuple[int, int]) -> list[tuple[int, int]]:
    """Boundary pixels (row, col) of the component holding ``start`` (its first pixel in raster order), clockwise."""
    # A zero border makes every neighbour look-up valid; flat indices keep the loop to list/array reads.
    padded = np.pad(mask, 1)
    stride = padded.shape[1]
    flat = padded.ravel().tolist()
    offsets = [dy * stride + dx for dy, dx in _NEIGHBOURS]
    # Seen from the next pixel (in direction d), the background neighbour before d is at direction back[d].
    back = [_NEIGHBOURS.index((_NEIGHBOURS[(d - 1) % 8][0] - _NEIGHBOURS[d][0],
                               _NEIGHBOURS[(d - 1) % 8][1] - _NEIGHBOURS[d][1])) for d in range(8)]
    point = (start[0] + 1) * stride + start[1] + 1
    came_from = 0  # the west neighbour of the first pixel in raster order is background
    boundary = [point]
    seen_states = set()
    while True:
        found = -1
        for step in range(1, 9):
            direction = (came_from + step) & 7
            if flat[point + offsets[direction]]:
                found = direction
                break
        if found < 0:  # an isolated pixel
            break
        state = point * 8 + found
        if state in seen_states:  # leaving the same pixel the same way again: the loop is closed
            boundary.pop()
            break
        seen_states.add(state)
        point += offsets[found]
        came_from = back[found]
        boundary.append(point)
    if len(boundary) > 1 and boundary[-1] == boundary[0]:
        boundary.pop()
    return [(index // stride - 1, index % stride - 1) for index in boundary]


def _corners(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop the vertices inside straight runs (same step in and out): the drawn lines stay the same pixels."""
    if len(points) < 3:
        return points
    kept = []
    count = len(points)
    for index in range(count):
        before, here, after = points[index - 1], points[index], points[(index + 1) % count]
        if (here[0] - before[0], here[1] - before[1]) != (after[0] - here[0], after[1] - here[1]):
            kept.append(here)
    return kept or points[:1]


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """One polygon (float [N >= 3, 2] as x, y pixel coordinates) per 8-connected component of ``mask``, largest
    first. Tiny components (a pixel, a 2-pixel line) repeat their points to make the 3 a polygon needs."""
    components, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    polygons = []
    sizes = np.bincount(components.ravel())[1:]
    slices = ndimage.find_objects(components)
    for label in np.argsort(-sizes, kind="stable") + 1:
        window = slices[label - 1]
        local = components[window] == label
        rows, cols = np.nonzero(local[:1])  # first row of the bounding box holds the first pixel in raster order
        start = (0, int(cols[0]))
        boundary = _corners(_trace(local, start))
        while len(boundary) < 3:
            boundary = boundary + boundary[:1]
        points = np.array([(col + window[1].start, row + window[0].start) for row, col in boundary], dtype=np.float64)
        polygons.append(points)
    return polygons


def paint_order(painted: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                prefer_first: Sequence[bool]) -> list[int]:
    """An order to paint regions in so that later ones repaint what earlier ones spill over: region A goes before
    B when A's painting covers pixels of B's target. Among regions free to go, ``prefer_first`` ones (stuff) go
    first, then by index; a cycle is broken the same way (that overlap stays lossy)."""
    count = len(painted)
    before = [set() for _ in range(count)]  # before[b]: regions that must be painted before b
    for a in range(count):
        for b in range(count):
            if a != b and (painted[a] & targets[b]).any():
                before[b].add(a)
    order: list[int] = []
    remaining = set(range(count))
    while remaining:
        ready = [index for index in remaining if not (before[index] & remaining)]
        pool = ready or list(remaining)
        choice = min(pool, key=lambda index: (not prefer_first[index], index))
        order.append(choice)
        remaining.remove(choice)
    return order


__all__ = ["mask_to_polygons", "paint_order", "rasterize"]
