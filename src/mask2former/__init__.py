"""Mask2Former, MaskFormer and MP-Former universal image segmentation in plain PyTorch."""

__version__ = "0.1.0"
