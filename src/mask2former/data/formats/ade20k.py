"""ADE20K-style semantic segmentation (uint8 PNGs, ``reduce_zero_label``) as a Dataset.

With ``reduce_zero_label`` raw 0 ("other") becomes ignore and raw v becomes class v-1 (detectron2's ``img - 1``,
mmseg's ``reduce_zero_label``, HF's ``do_reduce_labels``); raw 255 also stays ignore, as in mmseg. Any other
value outside the label space is an error naming the file. Semantic PNGs cannot separate instances, so each present
class gives one mask (thing classes included) and ``iscrowd`` is False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..image_io import read_image, read_label_png
from ..label_space import LabelSpace, builtin_label_space
from ._common import Transforms, apply_transforms, check_same_size, make_sample, map_raw_labels, masks_from_semantic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_object_info(path: str | Path) -> list[str]:
    """Class names from ADEChallengeData2016's ``objectInfo150.txt`` (tab-separated, ``Name`` is the last column)."""
    lines = Path(path).read_text().splitlines()
    names = []
    for line in lines[1:]:
        if line.strip():
            names.append(line.split("\t")[-1].strip())
    return names


def ade20k_label_space(names: list[str] | None = None, num_classes: int = 150,
                       reduce_zero_label: bool = True) -> LabelSpace:
    """All-stuff label space whose dataset ids are the raw PNG values (1..K with ``reduce_zero_label``, else 0..K-1).

    Without ``names``, 150 classes are the built-in ADE20K table (the reference's names and palette); other counts
    are named ``class_<i>``."""
    offset = 1 if reduce_zero_label else 0
    if names is None and num_classes == 150:
        table = builtin_label_space("ade20k")
        return LabelSpace(names=table.names, is_thing=table.is_thing, colors=table.colors,
                          dataset_ids=[index + offset for index in range(table.num_classes)],
                          ignore_index=table.ignore_index)
    if names is None:
        names = [f"class_{index}" for index in range(num_classes)]
    return LabelSpace(names=names, is_thing=[False] * len(names),
                      dataset_ids=[index + offset for index in range(len(names))])


def pair_images_and_labels(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """Sorted (image, label PNG) pairs matched by file stem; a missing label is an error naming both paths."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    pairs = []
    for image_path in sorted(image_dir.iterdir()):
        if image_path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.is_file():
            raise FileNotFoundError(f"no label {label_path} for image {image_path}")
        pairs.append((image_path, label_path))
    if not pairs:
        raise ValueError(f"no images found in {image_dir}")
    return pairs


class ADE20KDataset(Dataset):
    """``root/images/<split>/*.jpg`` with ``root/annotations/<split>/*.png`` (ADEChallengeData2016 layout).

    Args:
        root: dataset root. ``root/objectInfo150.txt``, when present, names the classes of ADE20K-style data with
            another class count; the benchmark's 150 classes take the built-in table's names.
        split: ``"training"`` or ``"validation"`` (any sub-folder name works).
        label_space: dataset ids must be the raw PNG values; defaults to ``ade20k_label_space``.
        reduce_zero_label: raw 0 is ignore and values are shifted down by one.
        num_classes: class count for the default label space without ``objectInfo150.txt`` (150: the built-in
            ADE20K table).
        transforms: callable applied to each sample dict.
    """

    def __init__(self, root: str | Path, split: str = "training", label_space: LabelSpace | None = None,
                 reduce_zero_label: bool = True, num_classes: int = 150, transforms: Transforms = None) -> None:
        self.root = Path(root)
        self.split = split
        self.reduce_zero_label = reduce_zero_label
        self.transforms = transforms
        if label_space is None:
            info_file = self.root / "objectInfo150.txt"
            names = read_object_info(info_file) if info_file.is_file() else None
            if names is not None and len(names) == 150:
                # The benchmark's own file: its synonym lists ("building;edifice") give way to the reference's
                # names (the built-in table), as detectron2 does.
                names = None
            label_space = ade20k_label_space(names, num_classes, reduce_zero_label)
        if reduce_zero_label and 0 in label_space.dataset_ids:
            raise ValueError("ADE20KDataset: reduce_zero_label=True makes raw 0 ignore, but the label space maps "
                             f"dataset id 0 to class {label_space.names[label_space.dataset_ids.index(0)]!r}")
        self.label_space = label_space
        self._table = label_space.lookup_table(256)
        self._ignore_values = (0, 255) if reduce_zero_label else (255,)
        self.pairs = pair_images_and_labels(self.root / "images" / split, self.root / "annotations" / split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label_png(label_path)
        check_same_size(image, raw.shape, image_path, label_path)
        semantic = map_raw_labels(raw, self._table, self.label_space.ignore_index, label_path, self._ignore_values)
        labels, masks = masks_from_semantic(semantic, self.label_space.ignore_index)
        sample = make_sample(image, labels, masks, [False] * len(labels), semantic, image_path.stem, str(image_path))
        return apply_transforms(sample, self.transforms)
