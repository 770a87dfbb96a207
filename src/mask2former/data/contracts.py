"""The dicts every module passes around: a data set's sample, a collated batch, and the criterion's target.

These are typed definitions for readers and type checkers; at run time they are plain dicts. Shapes: ``H, W`` the
image size, ``Hp, Wp`` the padded batch size, ``N`` the segments of one image; class ids index the data set's
:class:`~mask2former.data.label_space.LabelSpace`, ``255`` marks ignored pixels.
"""

from __future__ import annotations

from typing import Any, Callable, TypedDict

from torch import Tensor

IGNORE_INDEX = 255  # semantic-map value of pixels that no class covers


class Sample(TypedDict):
    """One image with its ground truth, as data sets and transforms return it (``formats/_common.make_sample``).

    ``image`` uint8 [3, H, W] RGB; ``labels`` int64 [N]; ``masks`` bool [N, H, W] (one per segment, crowd ones
    included); ``iscrowd`` bool [N]; ``semantic`` int64 [H, W] (class id per pixel, IGNORE_INDEX where unlabelled);
    ``image_id`` the data set's id; ``file_name`` the image file; ``orig_size`` (H, W) as read, before transforms.
    """

    image: Tensor
    labels: Tensor
    masks: Tensor
    iscrowd: Tensor
    semantic: Tensor
    image_id: str | int
    file_name: str
    orig_size: tuple[int, int]


class BatchTarget(TypedDict):
    """One image's ground truth inside a :class:`Batch`: ``labels`` int64 [N], ``masks`` bool [N, Hp, Wp]
    (False on padding), ``iscrowd`` bool [N], ``semantic`` int64 [Hp, Wp] (IGNORE_INDEX on padding)."""

    labels: Tensor
    masks: Tensor
    iscrowd: Tensor
    semantic: Tensor


class Batch(TypedDict):
    """Samples of different sizes collated (``collate.collate``): ``images`` uint8 [B, 3, Hp, Wp] zero-padded
    bottom/right to a multiple of the model's size divisibility; ``padding_mask`` bool [B, Hp, Wp] (True on padding);
    ``image_sizes`` (h, w) before padding; ``targets`` per image; ``samples`` the samples as given."""

    images: Tensor
    padding_mask: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[BatchTarget]
    samples: list[Sample]


class CriterionTarget(TypedDict):
    """What the matcher and criterion take per image: crowd segments removed, on the model's device.
    ``labels`` int64 [N] in ``[0, num_classes)``; ``masks`` bool or float [N, Hp, Wp]."""

    labels: Tensor
    masks: Tensor


Transform = Callable[[Sample], Sample]
"""A training transform: a sample in, a sample out (``transforms.py``)."""

SampleDataset = Any
"""A map-style data set: ``len(dataset)``, ``dataset[i] -> Sample`` and a ``label_space`` attribute."""

__all__ = ["IGNORE_INDEX", "Batch", "BatchTarget", "CriterionTarget", "Sample", "SampleDataset", "Transform"]
