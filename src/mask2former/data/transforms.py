"""Sample-level augmentations that move the image, the masks and the semantic map together.

Every transform takes and returns the sample dict of INTERFACES.md. Geometry uses torchvision transforms v2 kernels
on ``tv_tensors`` (bilinear + antialias for the image, pixel-centre nearest for masks and the semantic map, like
PIL's NEAREST in detectron2); photometric transforms touch only the image. Randomness comes from torch's global RNG
(seed it, or let the DataLoader seed each worker).

Empty masks: a crop or a downscale can leave a segment with no pixel. With ``drop_empty=True`` (the default, as in
Mask2Former's instance LSJ mapper, which filters empty instances) such segments are removed from ``labels``,
``masks`` and ``iscrowd``; ``drop_empty=False`` keeps them (as the reference panoptic LSJ mapper does).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Sample = dict[str, Any]

__all__ = [
    "Compose",
    "ResizeShortestEdge",
    "RandomCrop",
    "LargeScaleJitter",
    "RandomHorizontalFlip",
    "ColorJitter",
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


def resize_sample(sample: Sample, height: int, width: int) -> Sample:
    """Resize image (bilinear, antialiased), masks and semantic (nearest) to ``(height, width)``."""
    size = [height, width]
    image = F.resize(tv_tensors.Image(sample["image"]), size, interpolation=v2.InterpolationMode.BILINEAR,
                     antialias=True)
    masks = sample["masks"]
    if masks.shape[0] > 0:
        masks = F.resize(tv_tensors.Mask(masks), size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    else:
        masks = masks.new_zeros((0, height, width))
    semantic = F.resize(tv_tensors.Mask(sample["semantic"][None]), size,
                        interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
    return {**sample, "image": image.as_subclass(torch.Tensor), "masks": masks.as_subclass(torch.Tensor),
            "semantic": semantic.as_subclass(torch.Tensor)}


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
    """Output size with the short side ``short_edge``, then shrunk so the long side is at most ``max_size``."""
    scale = short_edge / min(height, width)
    new_height, new_width = height * scale, width * scale
    longest = max(new_height, new_width)
    if longest > max_size:
        new_height, new_width = new_height * max_size / longest, new_width * max_size / longest
    return max(1, int(new_height + 0.5)), max(1, int(new_width + 0.5))


# ----------------------------------------------------------------------------------------------------- transforms
class ResizeShortestEdge:
    """Resize so the short side is ``short_edge_length`` (one of them with ``"choice"``, or a value in the
    [min, max] range with ``"range"``) with the long side capped at ``max_size`` (detectron2's ResizeShortestEdge)."""

    def __init__(self, short_edge_length: int | Sequence[int], max_size: int = 1 << 30, sample_style: str = "choice",
                 drop_empty: bool = True) -> None:
        lengths = [short_edge_length] if isinstance(short_edge_length, int) else list(short_edge_length)
        if not lengths or any(length <= 0 for length in lengths):
            raise ValueError(f"ResizeShortestEdge: short_edge_length must be positive, got {short_edge_length!r}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"ResizeShortestEdge: sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(lengths) != 2:
            raise ValueError(f"ResizeShortestEdge: sample_style='range' needs (min, max), got {lengths!r}")
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
            sample = resize_sample(sample, new_height, new_width)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return (f"ResizeShortestEdge(short_edge_length={self.short_edge_length}, max_size={self.max_size}, "
                f"sample_style={self.sample_style!r})")


class RandomCrop:
    """Random crop of at most ``crop_size`` (h, w); a smaller image is kept whole (the collate pads it).

    With ``single_category_max_area < 1`` the crop is redrawn (up to ``max_tries``, keeping the last) until it holds
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
            for _ in range(self.max_tries):
                top, left, crop_height, crop_width = window
                region = sample["semantic"][top:top + crop_height, left:left + crop_width]
                _, counts = torch.unique(region[region != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() < self.single_category_max_area * counts.sum().item():
                    break
                window = self._window(height, width)
        sample = crop_sample(sample, *window)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, single_category_max_area={self.single_category_max_area})"


class LargeScaleJitter:
    """COCO large-scale jitter: rescale so the image fits ``scale * image_size`` (scale uniform in
    [min_scale, max_scale]), take a random ``image_size`` square crop, pad bottom/right to the square
    (image ``image_pad_value``, masks 0, semantic ``ignore_index``); detectron2's ResizeScale + FixedSizeCrop.

    The reference pads the image with 128 (about the pixel mean); we default to 0 so padding looks like the collate's
    padding, pass ``image_pad_value=128`` to match the reference exactly.
    """

    def __init__(self, image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                 image_pad_value: int = 0, ignore_index: int = 255, drop_empty: bool = True) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"LargeScaleJitter: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.image_size = image_size
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.image_pad_value = image_pad_value
        self.ignore_index = ignore_index
        self.drop_empty = drop_empty

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        target = _uniform(self.min_scale, self.max_scale) * self.image_size
        scale = min(target / height, target / width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        sample = resize_sample(sample, new_height, new_width)
        top = round(max(new_height - self.image_size, 0) * float(torch.rand(()).item()))
        left = round(max(new_width - self.image_size, 0) * float(torch.rand(()).item()))
        sample = crop_sample(sample, top, left, min(self.image_size, new_height), min(self.image_size, new_width))
        sample = pad_sample(sample, self.image_size, self.image_size, self.image_pad_value, self.ignore_index)
        return _drop_empty_segments(sample) if self.drop_empty else sample

    def __repr__(self) -> str:
        return (f"LargeScaleJitter(image_size={self.image_size}, min_scale={self.min_scale}, "
                f"max_scale={self.max_scale})")


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
    """Photometric jitter of the image only (labels untouched). Defaults match the magnitudes of the SSD colour
    augmentation Mask2Former's semantic recipe uses (brightness +-32/255, contrast and saturation x[0.5, 1.5],
    hue +-18 degrees)."""

    def __init__(self, brightness: float = 32 / 255, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 18 / 360) -> None:
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def __call__(self, sample: Sample) -> Sample:
        image = self.jitter(tv_tensors.Image(sample["image"]))
        return {**sample, "image": image.as_subclass(torch.Tensor)}

    def __repr__(self) -> str:
        return f"ColorJitter({self.jitter!r})"


# ----------------------------------------------------------------------------------------------------- recipes
def semantic_train_transforms(crop_size: int = 512, min_scale: float = 0.5, max_scale: float = 2.0,
                              max_size: int | None = None, single_category_max_area: float = 1.0,
                              color_jitter: bool = True, ignore_index: int = 255) -> Compose:
    """Mask2Former's semantic recipe: short side in {crop*0.5, crop*0.6, ..., crop*2.0}, random crop (optionally
    category-area constrained), colour jitter, horizontal flip."""
    steps = int(round((max_scale - min_scale) * 10))
    lengths = sorted({int(crop_size * (min_scale + 0.1 * step)) for step in range(steps + 1)})
    transforms: list[Callable[[Sample], Sample]] = [
        ResizeShortestEdge(lengths, max_size=max_size or 4 * crop_size, sample_style="choice"),
        RandomCrop(crop_size, single_category_max_area=single_category_max_area, ignore_index=ignore_index),
    ]
    if color_jitter:
        transforms.append(ColorJitter())
    transforms.append(RandomHorizontalFlip())
    return Compose(transforms)


def lsj_train_transforms(image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                         drop_empty: bool = True, image_pad_value: int = 0) -> Compose:
    """Mask2Former's COCO recipe: horizontal flip, then large-scale jitter to a square ``image_size`` crop."""
    return Compose([RandomHorizontalFlip(),
                    LargeScaleJitter(image_size, min_scale, max_scale, image_pad_value=image_pad_value,
                                     drop_empty=drop_empty)])


def eval_transforms(short_edge_length: int, max_size: int = 1 << 30) -> Compose:
    """Deterministic test-time resize (keeps empty segments: evaluation must see every ground-truth segment)."""
    return Compose([ResizeShortestEdge(short_edge_length, max_size=max_size, drop_empty=False)])

