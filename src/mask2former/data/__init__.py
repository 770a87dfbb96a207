"""Data layer: the sample / batch / target contracts (``contracts.py``), label space, image/label reading, format
readers, FashionScenes, transforms, collate, and the builders from a config (``build.py``)."""

from .collate import collate
from .export import export_fashion_scenes, export_samples
from .fashion_scenes import FashionScenes, fashion_scenes_label_space
from .formats import (
    ADE20KDataset,
    CityscapesDataset,
    CocoInstanceDataset,
    CocoPanopticDataset,
    FolderDataset,
    ade20k_label_space,
    cityscapes_label_space,
)
from .image_io import read_image, read_label_png
from .label_space import LabelSpace

__all__ = [
    "ADE20KDataset",
    "CityscapesDataset",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "FashionScenes",
    "FolderDataset",
    "LabelSpace",
    "ade20k_label_space",
    "cityscapes_label_space",
    "collate",
    "export_fashion_scenes",
    "export_samples",
    "fashion_scenes_label_space",
    "read_image",
    "read_label_png",
]
