"""FashionScenes: the built-in panoptic data set, generated deterministically from a seed.

Each scene is a canvas split into 2-3 Voronoi cells ("stuff": real CC0 texture photos bundled with scikit-image:
grass, gravel, brick) with 2-10 Fashion-MNIST items ("things", 10 classes) pasted at random scale, tint and position;
later items occlude earlier ones. Labels are exact by construction:
- an item's mask is ``pixel > 10`` after resizing, with holes filled (all components kept);
- its segment is the part left visible by the items above it; items hidden completely are dropped before emitting;
- stuff segments are one per texture region, minus the items on top; the semantic map has no void.

Leakage control: train scenes use Fashion-MNIST "train" items and the left half (columns 0-255) of every texture;
val scenes use t10k items with index < 5000, test scenes t10k items with index >= 5000, both with the right texture
halves. Every scene draws from its own RNG seeded by (seed, split, index), so a sample does not depend on worker order
or on which other samples were generated; the same (seed, split, index, source, sizes) gives the same bytes.
Sample ordering: things in z-order (bottom first), then stuff in class order. ``image_id`` is the index.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes
from torch.utils.data import Dataset

from . import fashion_mnist
from .formats._common import make_sample
from .label_space import LabelSpace

TEXTURES = ("grass", "gravel", "brick")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
ITEM_THRESHOLD = 10  # pixel > 10: measured to give few stray components (> 0 gives stray pixels on 89 % of items)
MIN_REGION_FRACTION = 0.1


def fashion_scenes_label_space() -> LabelSpace:
    """10 thing classes (Fashion-MNIST, contiguous 0-9) then one stuff class per texture; dataset ids start at 1."""
    names = list(fashion_mnist.CLASS_NAMES) + list(TEXTURES)
    is_thing = [True] * len(fashion_mnist.CLASS_NAMES) + [False] * len(TEXTURES)
    return LabelSpace(names=names, is_thing=is_thing, dataset_ids=list(range(1, len(names) + 1)))


@lru_cache(maxsize=None)
def load_texture(name: str) -> np.ndarray:
    """512x512 uint8 grayscale texture bundled in the scikit-image wheel (no download)."""
    import skimage.data

    texture = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
    if texture.ndim != 2:
        raise ValueError(f"texture {name!r} is not grayscale: shape {texture.shape}")
    return texture


def texture_half(name: str, split: str) -> tuple[np.ndarray, int]:
    """The half of a texture a split may use (train: left columns, val/test: right columns) and its column offset."""
    texture = load_texture(name)
    middle = texture.shape[1] // 2
    if split == "train":
        return texture[:, :middle], 0
    return texture[:, middle:], middle


@dataclass(frozen=True)
class PlacedItem:
    """One pasted item: where it came from and where it went (``box`` = top, left, height, width on the canvas)."""

    source_split: str
    source_index: int
    label: int
    box: tuple[int, int, int, int]
    tint: tuple[int, int, int]
    visible: bool


@dataclass(frozen=True)
class TextureCrop:
    """One stuff region's texture and its crop window in full-texture coordinates (top, left, height, width)."""

    texture: str
    label: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H,W,3]
    labels: np.ndarray  # int64 [N] contiguous ids
    masks: np.ndarray  # bool [N,H,W], disjoint, non-empty, covering the canvas
    semantic: np.ndarray  # int64 [H,W] contiguous class per pixel (no void)
    items: list[PlacedItem]
    regions: list[TextureCrop]


def _random_tint(rng: np.random.Generator) -> np.ndarray:
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.35, 0.9), rng.uniform(0.65, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


class FashionScenes(Dataset):
    """Deterministic synthetic panoptic scenes of real Fashion-MNIST items on real texture photos.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_images: length of the data set.
        seed: base seed; scene ``i`` is generated from (seed, split, i) alone.
        image_size: canvas size, an int (square) or ``(height, width)``.
        source: Fashion-MNIST source, ``"auto"`` (Debian files if installed, else the shipped subset), ``"full"`` or
            ``"subset"``; resolved once, see ``self.source``.
        transforms: callable applied to each sample dict.
        min_items, max_items: items per scene (inclusive), before occlusion.
        item_scale: item side as a fraction of the canvas short side, drawn uniformly in this range.
        min_regions, max_regions: stuff regions per scene (inclusive, at most the number of textures).
    """

    label_space = fashion_scenes_label_space()

    def __init__(self, split: str = "train", num_images: int = 1000, seed: int = 0,
                 image_size: int | tuple[int, int] = 256, source: str = "auto",
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 min_items: int = 2, max_items: int = 10, item_scale: tuple[float, float] = (0.12, 0.35),
                 min_regions: int = 2, max_regions: int = 3) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"FashionScenes: split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
        if num_images < 0:
            raise ValueError(f"FashionScenes: num_images must be >= 0, got {num_images}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(height, width) < 16:
            raise ValueError(f"FashionScenes: image_size must be at least 16, got {image_size!r}")
        if not 1 <= min_items <= max_items:
            raise ValueError(f"FashionScenes: need 1 <= min_items <= max_items, got {min_items}, {max_items}")
        if not 0 < item_scale[0] <= item_scale[1] <= 1:
            raise ValueError(f"FashionScenes: item_scale must satisfy 0 < low <= high <= 1, got {item_scale}")
        if not 1 <= min_regions <= max_regions <= len(TEXTURES):
            raise ValueError(f"FashionScenes: need 1 <= min_regions <= max_regions <= {len(TEXTURES)}, got "
                             f"{min_regions}, {max_regions}")
        self.split = split
        self.num_images = num_images
        self.seed = seed
        self.image_size = (height, width)
        self.source = fashion_mnist.resolve_source(source)
        self.transforms = transforms
        self.min_items, self.max_items = min_items, max_items
        self.item_scale = item_scale
        self.min_regions, self.max_regions = min_regions, max_regions
        items = fashion_mnist.load_items("train" if split == "train" else "t10k", self.source)
        if split == "train":
            keep = np.ones(len(items.indices), dtype=bool)
        else:
            half = 5000  # t10k has 10 000 items: val takes the first half, test the second
            keep = items.indices < half if split == "val" else items.indices >= half
        self.item_split = items.split
        self.item_images = items.images[keep]
        self.item_labels = items.labels[keep]
        self.item_indices = items.indices[keep]
        self.textures = {name: texture_half(name, split) for name in TEXTURES}

    def __len__(self) -> int:
        return self.num_images

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_CODES[self.split], index]))

    # ------------------------------------------------------------------------------------------------- generation
    def _regions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Voronoi cells of ``count`` random points, redrawn (bounded) until each covers >= 10 % of the canvas."""
        height, width = self.image_size
        rows = np.arange(height, dtype=np.float32)[:, None, None]
        cols = np.arange(width, dtype=np.float32)[None, :, None]
        region_map = np.zeros((height, width), dtype=np.int64)
        for _ in range(20):
            points = rng.uniform(0.0, 1.0, size=(count, 2)) * np.array([height, width])
            distances = (rows - points[:, 0].astype(np.float32)) ** 2 + (cols - points[:, 1].astype(np.float32)) ** 2
            region_map = distances.argmin(axis=2)
            areas = np.bincount(region_map.ravel(), minlength=count)
            if areas.min() >= MIN_REGION_FRACTION * height * width:
                break
        return region_map

    def _texture_patch(self, rng: np.random.Generator, name: str,
                       inside: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """RGB values for the ``inside`` pixels from a random crop of the split's texture half, and the crop box."""
        height, width = self.image_size
        half, column_offset = self.textures[name]
        half_height, half_width = half.shape
        zoom = rng.uniform(0.5, 1.0) * min(half_height / height, half_width / width)
        crop_height = min(half_height, max(8, round(height * zoom)))
        crop_width = min(half_width, max(8, round(width * zoom)))
        top = int(rng.integers(0, half_height - crop_height + 1))
        left = int(rng.integers(0, half_width - crop_width + 1))
        crop = half[top:top + crop_height, left:left + crop_width]
        patch = np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR), dtype=np.float32)
        contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-25.0, 25.0)
        mean = patch.mean()
        values = (patch[inside] - mean) * contrast + mean + brightness
        tint = 1.0 + rng.uniform(-0.08, 0.08, size=3).astype(np.float32)
        rgb = np.clip(np.rint(values[:, None] * tint), 0, 255).astype(np.uint8)
        return rgb, (top, left + column_offset, crop_height, crop_width)

    def scene(self, index: int) -> Scene:
        """Generate scene ``index`` (with provenance)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"FashionScenes index {index} out of range [0, {self.num_images})")
        rng = self.rng(index)
        height, width = self.image_size
        num_things = len(fashion_mnist.CLASS_NAMES)

        # Stuff: distinct textures in Voronoi cells.
        region_count = int(rng.integers(self.min_regions, self.max_regions + 1))
        texture_ids = rng.choice(len(TEXTURES), size=region_count, replace=False)
        region_map = self._regions(rng, region_count)
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        regions = []
        for region, texture_id in enumerate(texture_ids.tolist()):
            inside = region_map == region
            canvas[inside], box = self._texture_patch(rng, TEXTURES[texture_id], inside)
            regions.append(TextureCrop(TEXTURES[texture_id], num_things + texture_id, box))

        # Things: pasted bottom to top; ``owner`` holds the 1-based item number on top at each pixel.
        owner = np.zeros((height, width), dtype=np.int64)
        item_count = int(rng.integers(self.min_items, self.max_items + 1))
        placements = []
        short_side = min(height, width)
        for number in range(1, item_count + 1):
            position = int(rng.integers(len(self.item_labels)))
            side = max(4, round(rng.uniform(*self.item_scale) * short_side))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            tint = _random_tint(rng)
            gray = np.asarray(Image.fromarray(self.item_images[position]).resize((side, side), Image.BILINEAR),
                              dtype=np.float32)
            mask = binary_fill_holes(gray > ITEM_THRESHOLD)
            color = np.clip(np.rint(gray[:, :, None] * tint), 0, 255).astype(np.uint8)
            window = (slice(top, top + side), slice(left, left + side))
            canvas[window][mask] = color[mask]
            owner[window][mask] = number
            placements.append((position, (top, left, side, side), tuple(int(v) for v in np.rint(tint * 255))))

        # One segment map: items keep their number (1..n), uncovered stuff pixels get n + 1 + region.
        segment_map = owner
        uncovered = owner == 0
        segment_map[uncovered] = item_count + 1 + region_map[uncovered]
        areas = np.bincount(segment_map.ravel(), minlength=item_count + 1 + region_count)
        label_of_segment = np.full(len(areas), self.label_space.ignore_index, dtype=np.int64)
        kept, items = [], []
        for number, (position, box, tint) in enumerate(placements, start=1):
            label = int(self.item_labels[position])
            label_of_segment[number] = label
            is_visible = bool(areas[number] > 0)
            if is_visible:  # a fully hidden item must not become an empty segment
                kept.append(number)
            items.append(PlacedItem(self.item_split, int(self.item_indices[position]), label, box, tint, is_visible))
        for region, crop in sorted(enumerate(regions), key=lambda pair: pair[1].label):
            segment_id = item_count + 1 + region
            label_of_segment[segment_id] = crop.label
            if areas[segment_id] > 0:
                kept.append(segment_id)
        kept_ids = np.array(kept, dtype=np.int64)
        masks = segment_map[None, :, :] == kept_ids[:, None, None]
        semantic = label_of_segment[segment_map]
        return Scene(canvas, label_of_segment[kept_ids], masks, semantic, items, regions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.num_images
        scene = self.scene(index)
        image = torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1)))
        sample = make_sample(image, scene.labels, scene.masks, np.zeros(len(scene.labels), dtype=bool),
                             scene.semantic, index, "")
        return self.transforms(sample) if self.transforms is not None else sample

    def __repr__(self) -> str:
        return (f"FashionScenes(split={self.split!r}, num_images={self.num_images}, seed={self.seed}, "
                f"image_size={self.image_size}, source={self.source!r})")
