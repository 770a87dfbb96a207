"""SSD colour augmentation on uint8 RGB, as Mask2Former's semantic recipe applies it (detectron2 PointRend's
``ColorAugSSDTransform``), with OpenCV's uint8 HSV arithmetic reimplemented in numpy (OpenCV is not a dependency).

HSV here is OpenCV's 8-bit HSV: H in 0..179 (degrees / 2), S and V in 0..255. ``rgb_to_hsv`` follows OpenCV's integer
fixed-point code (12-bit tables), ``hsv_to_rgb`` its vectorised float32 code; both agree with ``cv2.cvtColor`` on every
one of the 2^24 inputs (checked against opencv-python-headless 5.0 on an AVX2/AVX-512 CPU).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rgb_to_hsv", "hsv_to_rgb", "ColorAugSSD"]

_HSV_SHIFT = 12
_HALF = 1 << (_HSV_SHIFT - 1)


def _cv_round(values: np.ndarray) -> np.ndarray:
    return np.rint(values).astype(np.int64)  # cvRound: to nearest, ties to even (no ties occur in these tables)


_INDEX = np.arange(256, dtype=np.float64)
_SDIV = np.where(_INDEX > 0, _cv_round((255 << _HSV_SHIFT) / np.maximum(_INDEX, 1)), 0)
_HDIV = np.where(_INDEX > 0, _cv_round((180 << _HSV_SHIFT) / (6.0 * np.maximum(_INDEX, 1))), 0)
# per hue sector 0..5: which of (v, v(1-s), v(1-s*f), v(1-s(1-f))) is r, g, b
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [..., 3] HSV exactly as ``cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)``."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_hsv: need uint8 [..., 3], got {rgb.dtype} {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * _SDIV[v] + _HALF) >> _HSV_SHIFT
    # OpenCV tests v == r first, then v == g
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + _HALF) >> _HSV_SHIFT  # arithmetic shift = floor, as in C on negative ints
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``1 - a*b`` rounded once, as the fused multiply-add OpenCV's AVX2/AVX-512 builds compile it to
    (the float32 product is exact in float64)."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] HSV (H 0..179) -> uint8 RGB as ``cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)`` computes it in its
    vectorised loop on an x86 CPU with FMA (OpenCV >= 4.1.1; every pixel of a row but a tail of ``width % 32`` or
    ``% 64`` that a scalar loop rounds instead): float32 arithmetic, ``1 - s*f`` fused, results truncated."""
    if hsv.dtype != np.uint8 or hsv.shape[-1] != 3:
        raise ValueError(f"hsv_to_rgb: need uint8 [..., 3], got {hsv.dtype} {hsv.shape}")
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * (f32(6.0) / f32(180.0))
    s = hsv[..., 1].astype(f32) * (f32(1.0) / f32(255.0))
    v = hsv[..., 2].astype(f32) * (f32(1.0) / f32(255.0))
    whole = np.trunc(h)
    fraction = h - whole
    one = f32(1.0)
    table = np.stack([v, v * (one - s), v * _one_minus_product(s, fraction),
                      v * _one_minus_product(s, one - fraction)], axis=-1)
    sector = (whole - np.trunc(whole * (f32(1.0) / f32(6.0))) * f32(6.0)).astype(np.int64)  # H <= 255: 0..5
    rgb = np.take_along_axis(table, _SECTOR_RGB[sector], axis=-1) * f32(255.0)
    return np.clip(np.trunc(rgb), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """float32 ``values * alpha + beta``, clipped to [0, 255], truncated to uint8 (the reference's ``convert``)."""
    out = values.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


class ColorAugSSD:
    """Brightness (+U(-32, 32)), then contrast (x U(0.5, 1.5)) before or after saturation (x U(0.5, 1.5) on HSV S)
    and hue (+ randint(-18, 18) on OpenCV's 0..179 H, modulo 180); each op applied with probability 1/2.

    Draw order and kinds follow the reference (a coin, then the op's value if the coin says so); draws come from
    Python's ``random`` module (like the reference; the DataLoader seeds it per worker). Labels are untouched.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    # random draws in one place so tests can force them
    @staticmethod
    def _coin() -> bool:
        return bool(random.randrange(2))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return random.uniform(low, high)

    @staticmethod
    def _randint(low: int, high: int) -> int:
        return random.randint(low, high)

    def brightness(self, rgb: np.ndarray) -> np.ndarray:
        if self._coin():
            return _convert(rgb, beta=self._uniform(-self.brightness_delta, self.brightness_delta))
        return rgb

    def contrast(self, rgb: np.ndarray) -> np.ndarray:
        if self._coin():
            return _convert(rgb, alpha=self._uniform(*self.contrast_range))
        return rgb

    def saturation(self, rgb: np.ndarray) -> np.ndarray:
        if self._coin():
            hsv = rgb_to_hsv(rgb)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=self._uniform(*self.saturation_range))
            return hsv_to_rgb(hsv)
        return rgb

    def hue(self, rgb: np.ndarray) -> np.ndarray:
        if self._coin():
            hsv = rgb_to_hsv(rgb)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + self._randint(-self.hue_delta, self.hue_delta)) % 180
            return hsv_to_rgb(hsv)
        return rgb

    def apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] RGB -> augmented copy."""
        rgb = self.brightness(rgb)
        if self._coin():
            rgb = self.hue(self.saturation(self.contrast(rgb)))
        else:
            rgb = self.contrast(self.hue(self.saturation(rgb)))
        return rgb

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"ColorAugSSD: sample {sample.get('image_id')!r} image must be uint8 [3,H,W], got "
                             f"{image.dtype} {tuple(image.shape)}")
        out = self.apply_rgb(image.permute(1, 2, 0).numpy())
        return {**sample, "image": torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()}

    def __repr__(self) -> str:
        return (f"ColorAugSSD(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})")

