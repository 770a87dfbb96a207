"""Readers for the on-disk formats; each is a plain ``torch.utils.data.Dataset`` producing the sample dict."""

from .ade20k import ADE20KDataset, ade20k_label_space
from .cityscapes import CityscapesDataset, cityscapes_label_space
from .coco import CocoInstanceDataset
from .coco_panoptic import CocoPanopticDataset, id_to_rgb, rgb_to_id
from .folder import FolderDataset
from .labelme import LabelmeDataset
from .voc import VocDataset, voc_label_space
from .yolo import YoloDataset

__all__ = [
    "ADE20KDataset",
    "CityscapesDataset",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "FolderDataset",
    "LabelmeDataset",
    "VocDataset",
    "YoloDataset",
    "ade20k_label_space",
    "cityscapes_label_space",
    "id_to_rgb",
    "rgb_to_id",
    "voc_label_space",
]
