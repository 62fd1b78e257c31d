"""ADE20K training augmentation, step for step as mmseg's pipeline in the reference config.

``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`` -> ``RandomCrop(512, cat_max_ratio=0.75)``
-> ``RandomFlip(0.5)`` -> ``PhotoMetricDistortion`` -> ``Pad(512, seg_pad_val=255)``. Images are
uint8 ``HxWx3`` numpy arrays and labels uint8 ``HxW`` until the final float conversion. Resizing
goes through ``torch.nn.functional.interpolate`` (bilinear without antialiasing for images,
floor-nearest for labels), which is what OpenCV's ``INTER_LINEAR`` / ``INTER_NEAREST`` compute;
Pillow's bilinear would low-pass filter on downscaling and shift the statistics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vpd_ray.data.augment.color import hsv8_to_rgb, rgb_to_hsv8

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's shift: 0 ("other") -> 255 (ignored), k -> k - 1 for k in 1..150."""
    label = label.astype(np.int16) - 1
    label[label < 0] = IGNORE_INDEX
    return label.astype(np.uint8)


def rescale_size(hw: tuple[int, int], scale: Sequence[int]) -> tuple[int, int]:
    """Keep-ratio target size: the largest ``hw`` fitting ``max(scale)`` x ``min(scale)`` (mmcv ``imrescale``)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``HxWx3`` image (OpenCV ``INTER_LINEAR`` semantics)."""
    if image.shape[:2] == tuple(hw):
        return image
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # copy: decoded arrays are read-only
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest resize of an ``HxW`` label map (OpenCV ``INTER_NEAREST`` semantics)."""
    if label.shape[:2] == tuple(hw):
        return label
    x = torch.from_numpy(np.array(label))[None, None]
    return F.interpolate(x, size=hw, mode="nearest")[0, 0].numpy()


def random_rescale(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: Sequence[int], ratio_range: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``Resize`` with ``ratio_range``: scale ``* U(ratio_range)``, then keep-ratio rescale."""
    ratio = rng.uniform(*ratio_range)
    hw = rescale_size(image.shape[:2], (int(scale[0] * ratio), int(scale[1] * ratio)))
    return resize_image(image, hw), resize_label(label, hw)


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_hw: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: up to 10 re-draws while one class fills ``>= cat_max_ratio`` of the crop.

    After 10 rejected crops the 11th is taken as it comes, as in mmseg.
    """

    ch, cw = crop_hw

    def draw() -> tuple[int, int]:
        return (
            int(rng.integers(0, max(image.shape[0] - ch, 0) + 1)),
            int(rng.integers(0, max(image.shape[1] - cw, 0) + 1)),
        )

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = np.unique(label[y : y + ch, x : x + cw], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: affine in float, clip, truncate back to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: brightness, contrast (before or after), saturation, hue; each p=0.5.

    Works in OpenCV's 8-bit HSV (hue 0..179) like mmseg, whose ``randint(-18, 18)`` excludes 18.
    """
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = rgb_to_hsv8(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv8_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv8(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        image = hsv8_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image


def to_float_padded(
    image: np.ndarray, label: np.ndarray, size_hw: tuple[int, int], image_value: float = 0.5,
    label_value: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image + label -> float ``[3,H,W]`` in [0,1] and long ``[H,W]`` (``size_hw``), padded bottom/right.

    The reference pads after normalising to [-1, 1] with 0, which is 0.5 here; labels pad with 255.
    """
    h, w = label.shape
    if h > size_hw[0] or w > size_hw[1]:
        raise ValueError(f"cannot pad a {h}x{w} crop to {size_hw[0]}x{size_hw[1]}")
    out_image = torch.full((3, *size_hw), image_value, dtype=torch.float32)
    out_image[:, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    out_label = torch.full(tuple(size_hw), label_value, dtype=torch.long)
    out_label[:h, :w] = torch.from_numpy(np.array(label)).long()
    return out_image, out_label


def seg_train_augment(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    crop_hw: tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full training pipeline on an already label-shifted sample -> (image ``[3,h,w]``, label ``[h,w]``)."""
    image, label = random_rescale(image, label, rng, scale, ratio_range)
    image, label = random_crop(image, label, rng, crop_hw, cat_max_ratio)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = photometric_distortion(image, rng)
    return to_float_padded(image, label, crop_hw)
