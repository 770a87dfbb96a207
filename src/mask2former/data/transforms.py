"""Sample-level augmentations that move the image, the masks and the semantic map together.

Every transform takes and returns a sample dict (``contracts.Sample``). Resizes are detectron2's: the uint8 image goes
through PIL's BILINEAR (antialiased when shrinking), label maps through a nearest lookup that is either PIL's NEAREST
(``label_resize="pil"``: detectron2 resizes uint8 label images, the panoptic PNGs, with PIL) or torch's legacy
``F.interpolate(mode="nearest")`` (``label_resize="torch"``: what detectron2 does to the float semantic maps of
Mask2Former's semantic mapper). Both lookups are separable index maps taken from the library itself, so they are
exact. Photometric transforms touch only the image. Randomness comes from torch's global RNG (``ColorAugSSD``: Python's
``random``, like the reference); seed it, or let the DataLoader seed each worker.

Empty masks: a crop or a downscale can leave a segment with no pixel. With ``drop_empty=True`` such segments are
removed from ``labels``, ``masks`` and ``iscrowd`` (Mask2Former's COCO instance mapper filters empty instances; its
semantic mapper rebuilds one mask per class present after augmentation, which is the same); ``drop_empty=False``
keeps them (its panoptic mappers, COCO LSJ and ADE20K/Cityscapes, keep every non-crowd segment).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .color import ColorAugSSD

Sample = dict[str, Any]

__all__ = [
    "Compose",
    "ResizeShortestEdge",
    "RandomCrop",
    "LargeScaleJitter",
    "RandomHorizontalFlip",
    "ColorJitter",
    "ColorAugSSD",
    "PadToSize",
    "resize_image",
    "semantic_train_transforms",
    "lsj_train_transforms",
    "eval_transforms",
]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(transform) for transform in self.transforms)
        return f"Compose([{inner}])"


# ----------------------------------------------------------------------------------------------------- geometry helpers
def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's RNG."""
    return int(torch.randint(low, high + 1, (1,)).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def _drop_empty_segments(sample: Sample) -> Sample:
    keep = sample["masks"].flatten(1).any(dim=1)
    if bool(keep.all()):
        return sample
    return {**sample, "labels": sample["labels"][keep], "masks": sample["masks"][keep],
            "iscrowd": sample["iscrowd"][keep]}


LABEL_RESIZES = ("pil", "torch")


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width] with PIL's BILINEAR (detectron2's ResizeTransform on uint8)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"resize_image: need a uint8 [3,H,W] image, got {image.dtype} {tuple(image.shape)}")
    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    resized = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=256)
def _nearest_index(in_size: int, out_size: int, kind: str) -> torch.Tensor:
    """Source index of each output position along one axis, read off the library that defines the resize."""
    if kind == "pil":  # PIL's NEAREST resize is separable: resizing an index ramp gives its lookup table
        ramp = Image.fromarray(np.arange(in_size, dtype=np.int32)[None])
        return torch.from_numpy(np.asarray(ramp.resize((out_size, 1), Image.NEAREST))[0].astype(np.int64))
    ramp = torch.arange(in_size, dtype=torch.float64).view(1, 1, 1, in_size)  # detectron2 interpolates float64
    return nnf.interpolate(ramp, size=(1, out_size), mode="nearest")[0, 0, 0].long()


def resize_labels(labels: torch.Tensor, height: int, width: int, kind: str = "pil") -> torch.Tensor:
    """Nearest resize of a [..., H, W] label tensor (any dtype) with PIL's or torch's index rule (see the module)."""
    if kind not in LABEL_RESIZES:
        raise ValueError(f"resize_labels: kind must be one of {LABEL_RESIZES}, got {kind!r}")
    rows = _nearest_index(int(labels.shape[-2]), height, kind)
    cols = _nearest_index(int(labels.shape[-1]), width, kind)
    return labels[..., rows[:, None], cols[None, :]].contiguous()


def resize_sample(sample: Sample, height: int, width: int, label_resize: str = "pil") -> Sample:
    """Resize image (PIL bilinear), masks and semantic (nearest, ``label_resize`` rule) to ``(height, width)``."""
    return {**sample, "image": resize_image(sample["image"], height, width),
            "masks": resize_labels(sample["masks"], height, width, label_resize),
            "semantic": resize_labels(sample["semantic"], height, width, label_resize)}


def crop_sample(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a window that lies inside the image (slicing; no padding)."""
    window = (slice(top, top + height), slice(left, left + width))
    return {**sample, "image": sample["image"][:, window[0], window[1]].contiguous(),
            "masks": sample["masks"][:, window[0], window[1]].contiguous(),
            "semantic": sample["semantic"][window[0], window[1]].contiguous()}


def pad_sample(sample: Sample, height: int, width: int, image_value: int = 0, ignore_index: int = 255) -> Sample:
    """Pad bottom/right to ``(height, width)``: image ``image_value``, masks False, semantic ``ignore_index``."""
    image, masks, semantic = sample["image"], sample["masks"], sample["semantic"]
    old_height, old_width = image.shape[-2:]
    if (old_height, old_width) == (height, width):
        return sample
    padded_image = image.new_full((image.shape[0], height, width), image_value)
    padded_image[:, :old_height, :old_width] = image
    padded_masks = masks.new_zeros((masks.shape[0], height, width))
    padded_masks[:, :old_height, :old_width] = masks
    padded_semantic = semantic.new_full((height, width), ignore_index)
    padded_semantic[:old_height, :old_width] = semantic
    return {**sample, "image": padded_image, "masks": padded_masks, "semantic": padded_semantic}


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output size with the short side ``short_edge``, then shrunk so the long side is at most ``max_size``
    (detectron2's ``ResizeShortestEdge.get_output_shape``, same float steps)."""
    size = float(short_edge)
    scale = size / min(height, width)
    new_height, new_width = (size, scale * width) if height < width else (scale * height, size)
    if max(new_height, new_width) > max_size:
        scale = max_size * 1.0 / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return max(1, int(new_height + 0.5)), max(1, int(new_width + 0.5))


# ----------------------------------------------------------------------------------------------------- transforms
class ResizeShortestEdge:
    """Resize so the short side is ``short_edge_length`` (one of them with ``"choice"``, or a value in the
    [min, max] range with ``"range"``) with the long side capped at ``max_size`` (detectron2's ResizeShortestEdge)."""

    def __init__(self, short_edge_length: int | Sequence[int], max_size: int = 1 << 30, sample_style: str = "choice",
                 drop_empty: bool = True, label_resize: str = "pil") -> None:
        lengths = [short_edge_length] if isinstance(short_edge_length, int) else list(short_edge_length)
        if not lengths or any(length <= 0 for length in lengths):
            raise ValueError(f"ResizeShortestEdge: short_edge_length must be positive, got {short_edge_length!r}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"ResizeShortestEdge: sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(lengths) != 2:
            raise ValueError(f"ResizeShortestEdge: sample_style='range' needs (min, max), got {lengths!r}")
        if label_resize not in LABEL_RESIZES:
            raise ValueError(f"ResizeShortestEdge: label_resize must be one of {LABEL_RESIZES}, got {label_resize!r}")
        self.label_resize = label_resize
        self.short_edge_length = lengths
        self.max_size = max_size
        self.sample_style = sample_style
        self.drop_empty = drop_empty

    def __call__(self, sample: Sample) -> Sample:
        if self.sample_style == "range":
            short_edge = _randint(self.short_edge_length[0], self.short_edge_length[1])
        else:
            short_edge = self.short_edge_length[_randint(0, len(self.short_edge_length) - 1)]
        height, width = sample["image"].shape[-2:]
        new_height, new_width = shortest_edge_size(height, width, short_edge, self.max_size)
        if (new_height, new_width) != (height, width):
            sample = resize_sample(sample, new_height, new_width, self.label_resize)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return (f"ResizeShortestEdge(short_edge_length={self.short_edge_length}, max_size={self.max_size}, "
                f"sample_style={self.sample_style!r}, label_resize={self.label_resize!r})")


class RandomCrop:
    """Random crop of at most ``crop_size`` (h, w); a smaller image is kept whole (the collate pads it).

    With ``single_category_max_area < 1`` the crop is drawn up to ``max_tries`` times (keeping the last) until it holds
    more than one labelled class and no class covers more than that fraction of the labelled pixels
    (detectron2's RandomCrop_CategoryAreaConstraint, used by Mask2Former's semantic recipe).
    """

    def __init__(self, crop_size: int | tuple[int, int], single_category_max_area: float = 1.0,
                 ignore_index: int = 255, max_tries: int = 10, drop_empty: bool = True) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if not 0.0 < single_category_max_area <= 1.0:
            raise ValueError(f"RandomCrop: single_category_max_area must be in (0, 1], got {single_category_max_area}")
        self.single_category_max_area = single_category_max_area
        self.ignore_index = ignore_index
        self.max_tries = max_tries
        self.drop_empty = drop_empty

    def _window(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_height, crop_width = min(self.crop_size[0], height), min(self.crop_size[1], width)
        return _randint(0, height - crop_height), _randint(0, width - crop_width), crop_height, crop_width

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        window = self._window(height, width)
        if self.single_category_max_area < 1.0:
            for attempt in range(self.max_tries):
                if attempt > 0:
                    window = self._window(height, width)
                top, left, crop_height, crop_width = window
                region = sample["semantic"][top:top + crop_height, left:left + crop_width]
                _, counts = torch.unique(region[region != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() < self.single_category_max_area * counts.sum().item():
                    break
        sample = crop_sample(sample, *window)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, single_category_max_area={self.single_category_max_area})"


class LargeScaleJitter:
    """COCO large-scale jitter: rescale so the image fits ``scale * image_size`` (scale uniform in
    [min_scale, max_scale]), take a random ``image_size`` square crop, pad bottom/right to the square
    (image ``image_pad_value``, masks 0, semantic ``ignore_index``); detectron2's ResizeScale + FixedSizeCrop.

    As FixedSizeCrop: the crop offset is ``round(max_offset * u)`` with ONE uniform ``u`` shared by both axes, and the
    uint8 image is padded with 128 (about the pixel mean), before normalisation.
    """

    def __init__(self, image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                 image_pad_value: int = 128, ignore_index: int = 255, drop_empty: bool = True,
                 label_resize: str = "pil") -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"LargeScaleJitter: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.image_size = image_size
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.image_pad_value = image_pad_value
        self.ignore_index = ignore_index
        self.drop_empty = drop_empty
        if label_resize not in LABEL_RESIZES:
            raise ValueError(f"LargeScaleJitter: label_resize must be one of {LABEL_RESIZES}, got {label_resize!r}")
        self.label_resize = label_resize

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        target = _uniform(self.min_scale, self.max_scale) * self.image_size
        scale = min(target / height, target / width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        sample = resize_sample(sample, new_height, new_width, self.label_resize)
        shared = _uniform(0.0, 1.0)  # one draw for both axes, as FixedSizeCrop
        top = round(max(new_height - self.image_size, 0) * shared)
        left = round(max(new_width - self.image_size, 0) * shared)
        sample = crop_sample(sample, top, left, min(self.image_size, new_height), min(self.image_size, new_width))
        sample = pad_sample(sample, self.image_size, self.image_size, self.image_pad_value, self.ignore_index)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return (f"LargeScaleJitter(image_size={self.image_size}, min_scale={self.min_scale}, "
                f"max_scale={self.max_scale}, image_pad_value={self.image_pad_value}, drop_empty={self.drop_empty})")


class PadToSize:
    """Pad bottom/right to exactly ``(height, width)``: image ``image_value`` (uint8, before normalisation), masks
    False, semantic ``ignore_index``. Mask2Former's semantic/panoptic mappers do this with
    ``INPUT.SIZE_DIVISIBILITY`` (the crop size on ADE20K) after all augmentations."""

    def __init__(self, size: int | tuple[int, int], image_value: int = 128, ignore_index: int = 255) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.image_value = image_value
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        if height > self.size[0] or width > self.size[1]:
            raise ValueError(f"PadToSize: sample {sample.get('image_id')!r} is {height}x{width}, larger than the "
                             f"pad size {self.size[0]}x{self.size[1]} (crop before padding)")
        return pad_sample(sample, self.size[0], self.size[1], self.image_value, self.ignore_index)

    def __repr__(self) -> str:
        return f"PadToSize(size={self.size}, image_value={self.image_value})"


class RandomHorizontalFlip:
    """Mirror image, masks and semantic map together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(()).item()) >= self.p:
            return sample
        return {**sample, "image": F.horizontal_flip(sample["image"]), "masks": F.horizontal_flip(sample["masks"]),
                "semantic": F.horizontal_flip(sample["semantic"])}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """torchvision's ColorJitter on the image only (labels untouched), every op always on. Not the reference's
    augmentation (that is :class:`ColorAugSSD`, which the recipes use); kept for custom pipelines."""

    def __init__(self, brightness: float = 32 / 255, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 18 / 360) -> None:
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def __call__(self, sample: Sample) -> Sample:
        image = self.jitter(tv_tensors.Image(sample["image"]))
        return {**sample, "image": image.as_subclass(torch.Tensor)}

    def __repr__(self) -> str:
        return f"ColorJitter({self.jitter!r})"


# ----------------------------------------------------------------------------------------------------- recipes
def short_edge_choices(base: int, min_scale: float, max_scale: float) -> list[int]:
    """Mask2Former's ``MIN_SIZE_TRAIN``: ``[int(x * 0.1 * base) for x in range(min*10, max*10 + 1)]`` (same floats)."""
    return [int(x * 0.1 * base) for x in range(int(round(min_scale * 10)), int(round(max_scale * 10)) + 1)]


def semantic_train_transforms(crop_size: int | tuple[int, int] = 512, min_scale: float = 0.5, max_scale: float = 2.0,
                              max_size: int | None = None, single_category_max_area: float = 1.0,
                              color_aug: bool = True, pad_to_crop: bool = False, drop_empty: bool = True,
                              label_resize: str = "torch", ignore_index: int = 255) -> Compose:
    """Mask2Former's semantic/panoptic mapper recipe (ADE20K, Cityscapes): short side chosen from
    ``short_edge_choices(longer crop side)`` with the long side at most ``max_size`` (default 4 x that side), random
    ``crop_size`` crop (category-area constrained below 1.0), SSD colour augmentation, horizontal flip, then with
    ``pad_to_crop`` a pad to the crop size (image 128, labels ignore; ADE20K's ``INPUT.SIZE_DIVISIBILITY``).

    Semantic targets: ``label_resize="torch"``, ``drop_empty=True`` (the reference resizes the float semantic map with
    torch nearest and builds one mask per class present). Panoptic targets: ``"pil"`` and ``drop_empty=False``."""
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    base = max(crop)
    transforms: list[Callable[[Sample], Sample]] = [
        ResizeShortestEdge(short_edge_choices(base, min_scale, max_scale), max_size=max_size or 4 * base,
                           sample_style="choice", drop_empty=drop_empty, label_resize=label_resize),
        RandomCrop(crop, single_category_max_area=single_category_max_area, ignore_index=ignore_index,
                   drop_empty=drop_empty),
    ]
    if color_aug:
        transforms.append(ColorAugSSD())
    transforms.append(RandomHorizontalFlip())
    if pad_to_crop:
        transforms.append(PadToSize(crop, image_value=128, ignore_index=ignore_index))
    return Compose(transforms)


def lsj_train_transforms(image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                         drop_empty: bool = True, image_pad_value: int = 128) -> Compose:
    """Mask2Former's COCO recipe: horizontal flip, then large-scale jitter to a square ``image_size`` crop.
    ``drop_empty``: True for instance targets (the instance mapper filters empty instances), False for panoptic."""
    return Compose([RandomHorizontalFlip(),
                    LargeScaleJitter(image_size, min_scale, max_scale, image_pad_value=image_pad_value,
                                     drop_empty=drop_empty)])


def eval_transforms(short_edge_length: int, max_size: int = 1 << 30) -> Compose:
    """Deterministic test-time resize: image with PIL bilinear, labels with PIL nearest (keeps empty segments:
    evaluation must see every ground-truth segment). The reference evaluates labels at the original size instead."""
    return Compose([ResizeShortestEdge(short_edge_length, max_size=max_size, drop_empty=False)])
