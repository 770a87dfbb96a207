"""Batching samples of different sizes: zero-pad bottom/right to a common size divisible by ``size_divisibility``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = 255


def _padded_extent(value: int, size_divisibility: int) -> int:
    if size_divisibility <= 1:
        return value
    return -(-value // size_divisibility) * size_divisibility


def collate(samples: Sequence[dict[str, Any]], size_divisibility: int = 32) -> dict[str, Any]:
    """Batch sample dicts (INTERFACES.md "Batch").

    Returns ``images`` uint8[B,3,Hp,Wp] (0-padded), ``padding_mask`` bool[B,Hp,Wp] (True on padding),
    ``image_sizes`` [(h, w)], ``targets`` [{labels, masks (False-padded), iscrowd, semantic (255-padded)}] and the
    original ``samples``.
    """
    if len(samples) == 0:
        raise ValueError("collate: got an empty list of samples")
    sizes = []
    for sample in samples:
        image = sample["image"]
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"collate: sample {sample.get('image_id')!r} image must be uint8 [3,H,W], got "
                             f"{image.dtype} {tuple(image.shape)}")
        height, width = int(image.shape[1]), int(image.shape[2])
        masks, semantic = sample["masks"], sample["semantic"]
        if masks.ndim != 3 or tuple(masks.shape[1:]) != (height, width) or tuple(semantic.shape) != (height, width):
            raise ValueError(f"collate: sample {sample.get('image_id')!r} masks {tuple(masks.shape)} / semantic "
                             f"{tuple(semantic.shape)} do not match its image {height}x{width}")
        sizes.append((height, width))
    padded_height = _padded_extent(max(size[0] for size in sizes), size_divisibility)
    padded_width = _padded_extent(max(size[1] for size in sizes), size_divisibility)

    batch_size = len(samples)
    images = torch.zeros((batch_size, 3, padded_height, padded_width), dtype=torch.uint8)
    padding_mask = torch.ones((batch_size, padded_height, padded_width), dtype=torch.bool)
    targets = []
    for index, (sample, (height, width)) in enumerate(zip(samples, sizes)):
        images[index, :, :height, :width] = sample["image"]
        padding_mask[index, :height, :width] = False
        masks = torch.zeros((sample["masks"].shape[0], padded_height, padded_width), dtype=torch.bool)
        masks[:, :height, :width] = sample["masks"]
        semantic = torch.full((padded_height, padded_width), IGNORE_INDEX, dtype=torch.int64)
        semantic[:height, :width] = sample["semantic"]
        targets.append({
            "labels": sample["labels"].to(torch.int64),
            "masks": masks,
            "iscrowd": sample["iscrowd"].to(torch.bool),
            "semantic": semantic,
        })
    return {
        "images": images,
        "padding_mask": padding_mask,
        "image_sizes": sizes,
        "targets": targets,
        "samples": list(samples),
    }
