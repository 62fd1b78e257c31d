"""8-bit HSV conversions (OpenCV's convention) shared by the depth and segmentation augmentations."""

from __future__ import annotations

import numpy as np


def rgb_to_hsv8(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV in OpenCV's 8-bit convention (H in 0..179 = degrees / 2)."""
    rgb = image.astype(np.float32)
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta * 255 / np.maximum(v, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    h = np.where(v == r, (g - b) / d * 60, np.where(v == g, 120 + (b - r) / d * 60, 240 + (r - g) / d * 60))
    h = np.where(delta > 0, np.mod(h, 360), 0) / 2
    return np.stack([np.round(h) % 180, np.round(s), v], -1).astype(np.uint8)


def hsv8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv8`."""
    h = hsv[..., 0].astype(np.float32) * 2 / 60
    s, v = hsv[..., 1] / np.float32(255), hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = [np.choose(sector, [row[c] for row in table]) for c in range(3)]
    return np.clip(np.round(np.stack(rgb, -1)), 0, 255).astype(np.uint8)
