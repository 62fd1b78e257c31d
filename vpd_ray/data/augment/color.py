"""8-bit HSV conversions (OpenCV's convention) on batches, shared by the depth and segmentation augmentations.

Both run on the training device after the host-to-device copy (see ``Task.augment_on_device``), on float32
tensors ``[B, 3, H, W]`` that hold whole 8-bit values 0..255: the photometric steps of the references work on
uint8 images and quantise after every step, and keeping whole values in float32 reproduces that exactly with
elementwise ops only (no host sync, no per-sample branch). The formulas are the float32 ones the numpy
implementation used, step for step, so CPU and GPU give the same values as it did.
"""

from __future__ import annotations

import torch

# Which of (v, q, p, t) each RGB channel takes in each 60-degree hue sector.
_SECTOR_PICK = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]])


def rgb_to_hsv8(rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB 0..255 -> HSV in OpenCV's 8-bit convention (H in 0..179 = degrees / 2), whole values."""
    r, g, b = rgb.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, delta * 255 / v.clamp_min(1e-6), 0)
    # The sector's offset + (difference / delta * 60), one division for all three sectors.
    is_r, is_g = v == r, v == g
    offset = torch.where(is_r, 0.0, torch.where(is_g, 120.0, 240.0))
    h = offset + torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)) / delta.clamp_min(1e-6) * 60
    h = torch.where(delta > 0, torch.remainder(h, 360), 0) / 2
    return torch.stack([torch.round(h) % 180, torch.round(s), v], 1)


def hsv8_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv8`: ``[B, 3, H, W]`` 8-bit HSV -> RGB 0..255, whole values."""
    h = hsv[:, 0] * 2 / 60
    s, v = hsv[:, 1] / 255, hsv[:, 2]
    sector = torch.floor(h)
    f = h - sector
    candidates = torch.stack([v, v * (1 - s * f), v * (1 - s), v * (1 - s * (1 - f))], 1)  # v, q, p, t: [B,4,H,W]
    pick = _SECTOR_PICK.to(hsv.device)[:, sector.long() % 6].movedim(0, 1)  # [B, 3, H, W]
    return torch.gather(candidates, 1, pick).round().clamp(0, 255)


def identity_lut(batch: int, device: torch.device) -> torch.Tensor:
    """``[B, 256]`` float32: the 8-bit lookup table that changes nothing, one row per sample."""
    return torch.arange(256, dtype=torch.float32, device=device).expand(batch, 256)


def apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-sample 8-bit lookup: ``[B, 3, H, W]`` whole values 0..255 (uint8 or float), ``[B, 256]`` -> float32."""
    return torch.gather(lut, 1, images.reshape(images.shape[0], -1).long()).view(images.shape)


def against(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``values`` ``[B]`` shaped to broadcast against ``like`` ``[B, ...]``."""
    return values.reshape(-1, *[1] * (like.dim() - 1))


def per_sample(flag: torch.Tensor, on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``on`` where a sample's ``flag`` ``[B]`` is set, else ``off`` (both ``[B, ...]``): a step without a branch."""
    return torch.where(against(flag, on) > 0, on, off)
