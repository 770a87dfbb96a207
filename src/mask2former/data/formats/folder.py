"""A plain folder of images plus semantic label PNGs, with a small YAML of class names.

Layout (``split`` optional)::

    root/classes.yaml             # names: [sky, road, car]  (+ optional is_thing, dataset_ids, ignore_index, colors)
    root/images/[split/]a.jpg     # any image format
    root/labels/[split/]a.png     # uint8 or 16-bit PNG: value = dataset id (default: class index),
                                  # ignore_index = unlabelled

The YAML may also use the ``classes: [{name, isthing, id, color}]`` form (see ``LabelSpace.from_yaml``). Each
present class gives one mask (semantic PNGs cannot separate instances); any value not in the label space is an
error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..image_io import read_image, read_label_png
from ..label_space import LabelSpace
from ._common import Transforms, apply_transforms, check_same_size, make_sample, map_raw_labels, masks_from_semantic
from .ade20k import pair_images_and_labels


class FolderDataset(Dataset):
    """Images + semantic label PNGs matched by file stem.

    Args:
        root: the folder.
        split: optional sub-folder of ``images/`` and ``labels/``.
        label_space: a ``LabelSpace``, or a path to its YAML; default ``root/classes.yaml``.
        image_dir, label_dir: folder names under ``root``.
        transforms: callable applied to each sample dict.
    """

    def __init__(self, root: str | Path, split: str | None = None, label_space: LabelSpace | str | Path | None = None,
                 image_dir: str = "images", label_dir: str = "labels", transforms: Transforms = None) -> None:
        self.root = Path(root)
        self.transforms = transforms
        if label_space is None:
            label_space = self.root / "classes.yaml"
        if not isinstance(label_space, LabelSpace):
            label_space = LabelSpace.from_yaml(label_space)
        self.label_space = label_space
        self._table = label_space.lookup_table(max(label_space.dataset_ids) + 1)
        images = self.root / image_dir
        labels = self.root / label_dir
        if split is not None:
            images, labels = images / split, labels / split
        self.pairs = pair_images_and_labels(images, labels)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label_png(label_path)
        check_same_size(image, raw.shape, image_path, label_path)
        ignore = self.label_space.ignore_index
        semantic = map_raw_labels(raw, self._table, ignore, label_path, ignore_values=(ignore,) if ignore >= 0 else ())
        labels, masks = masks_from_semantic(semantic, ignore)
        sample = make_sample(image, labels, masks, [False] * len(labels), semantic, image_path.stem, str(image_path))
        return apply_transforms(sample, self.transforms)
