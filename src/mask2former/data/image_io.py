"""Reading images (RGB uint8, EXIF-oriented) and label PNGs (raw values) with one-line errors naming the file.

Mode conversion follows what detectron2's ``read_image(format="RGB")`` and ``PIL.Image.convert("RGB")`` give, except
for 16-bit grayscale: PIL clips ``I;16`` values above 255 to white, which turns most 16-bit pictures white, so we keep
the top 8 bits instead (``value >> 8``, as libpng's strip-16 and torchvision's ``to_dtype(uint8, scale=True)`` do).
Alpha channels are dropped, not composited (as PIL/detectron2/torchvision do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["read_image", "read_label_png"]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _open_decoded(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode (so truncation is detected here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {what} file {path}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as error:
        message = one_line(error)
        if "truncated" in message.lower() or isinstance(error, (SyntaxError,)):
            raise ValueError(f"truncated or corrupt {what} file {path}: {message}") from None
        raise ValueError(f"cannot read {what} file {path}: {message}") from None
    return image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3] RGB (the one conversion the readers and the web demo share)."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (Pillow opens 16-bit PNGs as I;16 or I): keep the top 8 bits.
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    # L, LA, RGBA, RGBa, P, PA, CMYK, YCbCr, LAB, HSV, 1: PIL's own conversion (alpha dropped, palette applied).
    return np.array(image.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``uint8 Tensor[3,H,W]`` RGB, after applying its EXIF orientation."""
    image = _open_decoded(path, "image")
    try:
        image = ImageOps.exif_transpose(image)
        array = to_rgb_array(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image file {path}: {one_line(error)}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG keeping raw values (no EXIF, no palette colours, no scaling).

    Returns ``uint8 [H,W]`` for L/P/1 images (P: palette indices), ``int32 [H,W]`` for 16-bit/32-bit images
    (Cityscapes instanceIds) and ``uint8 [H,W,3]`` for RGB (COCO panoptic). Other modes are a ValueError.
    """
    image = _open_decoded(path, "label")
    mode = image.mode
    if mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.asarray(image).astype(np.int32)
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    raise ValueError(f"label file {path} has image mode {mode}; expected L, P, I;16, I or RGB")

