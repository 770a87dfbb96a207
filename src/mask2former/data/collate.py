"""Batching samples of different sizes: zero-pad bottom/right to a common size divisible by ``size_divisibility``."""

from __future__ import annotations

from typing import Sequence

import torch

from .contracts import IGNORE_INDEX, Batch, Sample


def padded_size(size: Sequence[int], size_divisibility: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of ``size_divisibility``."""
    height, width = int(size[0]), int(size[1])
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    return height, width


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Stack [3, h, w] images into [B, 3, H, W], zero-padded bottom/right to a multiple of ``size_divisibility``;
    returns the batch, the padding mask (True = padded) and the sizes before padding."""
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    height, width = padded_size((max(h for h, _ in sizes), max(w for _, w in sizes)), size_divisibility)
    batch = images[0].new_zeros((len(images), 3, height, width))
    padding_mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for index, (image, (h, w)) in enumerate(zip(images, sizes)):
        batch[index, :, :h, :w] = image
        padding_mask[index, :h, :w] = False
    return batch, padding_mask, sizes


def collate(samples: Sequence[Sample], size_divisibility: int = 32) -> Batch:
    """Batch sample dicts (:class:`~mask2former.data.contracts.Batch`).

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
    images, padding_mask, _ = pad_images([sample["image"] for sample in samples], size_divisibility)
    padded_height, padded_width = images.shape[-2:]
    targets = []
    for sample, (height, width) in zip(samples, sizes):
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
