"""Helpers shared by the format readers: the sample dict, raw-label mapping and consistency checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..contracts import Sample

Transforms = Callable[[dict[str, Any]], dict[str, Any]] | None


def make_sample(
    image: torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    iscrowd: Sequence[bool] | np.ndarray | torch.Tensor,
    semantic: np.ndarray | torch.Tensor,
    image_id: str | int,
    file_name: str,
) -> Sample:
    """Build the :class:`~mask2former.data.contracts.Sample` dict with the exact dtypes."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    masks = torch.as_tensor(np.asarray(masks, dtype=bool) if not torch.is_tensor(masks) else masks).to(torch.bool)
    if masks.numel() == 0:
        masks = masks.reshape(0, height, width)
    return {
        "image": image,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        "masks": masks,
        "iscrowd": torch.as_tensor(np.asarray(iscrowd, dtype=bool).reshape(-1)),
        "semantic": torch.as_tensor(np.asarray(semantic, dtype=np.int64)),
        "image_id": image_id,
        "file_name": file_name,
        "orig_size": (height, width),
    }


def check_same_size(image: torch.Tensor, label_shape: tuple[int, ...], image_path: str | Path,
                    label_path: str | Path) -> None:
    image_hw = (int(image.shape[-2]), int(image.shape[-1]))
    label_hw = (int(label_shape[0]), int(label_shape[1]))
    if image_hw != label_hw:
        raise ValueError(f"label {label_path} is {label_hw[1]}x{label_hw[0]} (WxH) but its image {image_path} "
                         f"is {image_hw[1]}x{image_hw[0]}")


def map_raw_labels(raw: np.ndarray, table: np.ndarray, ignore_index: int, path: str | Path,
                   ignore_values: Sequence[int] = ()) -> np.ndarray:
    """Map raw label values to contiguous ids with ``table`` (-1 = unknown); ``ignore_values`` -> ignore_index.

    Any value that is neither in the table nor an ignore value is a ValueError naming the file and the value.
    """
    if raw.ndim != 2:
        raise ValueError(f"label file {path} has shape {raw.shape}; expected a single-channel [H,W] map")
    raw = raw.astype(np.int64)
    size = max(len(table), int(raw.max()) + 1 if raw.size else 0, max(ignore_values, default=-1) + 1)
    full = np.full(size, -1, dtype=np.int64)
    full[: len(table)] = table
    for value in ignore_values:
        full[value] = ignore_index
    if raw.size and raw.min() < 0:
        raise ValueError(f"label file {path} contains negative value {int(raw.min())}")
    semantic = full[raw]
    unknown = semantic < 0
    if unknown.any():
        bad = np.unique(raw[unknown])
        raise ValueError(f"label file {path} contains unknown label value(s) {bad[:10].tolist()} "
                         f"(not in the label space and not ignored)")
    return semantic


def masks_from_semantic(semantic: np.ndarray, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """One mask per present class (ascending class id), ignore excluded: ``(labels int64[N], masks bool[N,H,W])``."""
    classes = np.unique(semantic)
    classes = classes[classes != ignore_index]
    masks = semantic[None, :, :] == classes[:, None, None]
    return classes.astype(np.int64), masks


def apply_transforms(sample: dict[str, Any], transforms: Transforms) -> dict[str, Any]:
    return transforms(sample) if transforms is not None else sample
