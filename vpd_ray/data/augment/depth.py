"""NYUv2 depth augmentation, as the VPD reference applies it (GLPDepth's pipeline).

Reference order, on the uint8 480x640 RGB image and the float32 metre depth:
CutDepth (on a quarter of the samples) -> horizontal flip (p 0.5) -> random crop ->
brightness/contrast (p 0.5, limits 0.2, brightness relative to 255) -> gamma (p 0.5, 0.8..1.2)
-> hue/saturation/value (p 0.5, shifts 20/30/20 in OpenCV's 8-bit HSV) -> to tensors (/255).
Photometric steps touch the image only; flip and crop apply to both.

Two deliberate choices, both documented in docs/architecture.md:
- "Every 4th sample": the reference counts samples per loader worker (``count % 4 == 0``), which
  on shuffled data is a 1-in-4 draw; here it is a draw with probability 0.25 from the sample's
  rng, so the transform is stateless and reproducible from the seed.
- CutDepth writes the depth in metres into the uint8 image, truncated to integers, exactly as the
  reference's numpy assignment does: the strip becomes near-black (0..10 of 255), not a rescaled
  depth map.
"""

from __future__ import annotations

import numpy as np
import torch

from vpd_ray.data.augment.color import hsv8_to_rgb, rgb_to_hsv8

CUTDEPTH_P = 0.25
CUTDEPTH_MAX_SHARE = 0.75  # the reference's p: the strip is at most 3/4 of the width to its right
FLIP_P = PHOTOMETRIC_P = 0.5
BRIGHTNESS_LIMIT = CONTRAST_LIMIT = 0.2
GAMMA_RANGE = (0.8, 1.2)
HUE_SHIFT, SAT_SHIFT, VAL_SHIFT = 20, 30, 20


def cut_depth(image: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace a random vertical strip of all three channels by the depth (uint8-truncated metres)."""
    width = image.shape[1]
    alpha, beta = rng.random(), rng.random()
    left = int(alpha * width)
    strip = int(max((width - alpha * width) * beta * CUTDEPTH_MAX_SHARE, 1))
    out = image.copy()
    out[:, left:left + strip, :] = depth[:, left:left + strip, None].astype(np.uint8)
    return out


def random_crop(image: np.ndarray, depth: np.ndarray, crop_hw: tuple[int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = depth.shape
    ch, cw = crop_hw
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} is larger than the {height}x{width} sample")
    top, left = int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1))
    return image[top:top + ch, left:left + cw], depth[top:top + ch, left:left + cw]


def _apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut.astype(np.uint8)[image]


def brightness_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha = 1.0 + rng.uniform(-CONTRAST_LIMIT, CONTRAST_LIMIT)
    beta = rng.uniform(-BRIGHTNESS_LIMIT, BRIGHTNESS_LIMIT)
    return _apply_lut(image, np.clip(np.arange(256, dtype=np.float32) * alpha + beta * 255, 0, 255))


def gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(*GAMMA_RANGE)
    return _apply_lut(image, (np.arange(256) / 255.0) ** g * 255)


def hue_saturation_value(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dh, ds, dv = rng.uniform(-HUE_SHIFT, HUE_SHIFT), rng.uniform(-SAT_SHIFT, SAT_SHIFT), rng.uniform(-VAL_SHIFT, VAL_SHIFT)
    hsv = rgb_to_hsv8(image)
    ramp = np.arange(256, dtype=np.float32)
    luts = (np.mod(ramp + dh, 180), np.clip(ramp + ds, 0, 255), np.clip(ramp + dv, 0, 255))
    shifted = np.stack([_apply_lut(hsv[..., c], luts[c]) for c in range(3)], -1)
    return hsv8_to_rgb(shifted)


def to_tensors(image: np.ndarray, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 + float HxW -> float32 [3,H,W] in [0,1] and float32 [1,H,W] metres."""
    image_t = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).div_(255)  # astype: a writable copy
    depth_t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    return image_t, depth_t


def train_augment(image: np.ndarray, depth: np.ndarray, rng: np.random.Generator,
                  crop_hw: tuple[int, int] = (480, 480)) -> tuple[torch.Tensor, torch.Tensor]:
    """VPD's NYU train augmentation: ``(uint8 [H,W,3], float32 [H,W] m) -> ([3,h,w] in [0,1], [1,h,w] m)``."""
    if image.shape[:2] != depth.shape:
        raise ValueError(f"image {image.shape[:2]} and depth {depth.shape} differ in size")
    if rng.random() < CUTDEPTH_P:
        image = cut_depth(image, depth, rng)
    if rng.random() < FLIP_P:
        image, depth = image[:, ::-1], depth[:, ::-1]
    image, depth = random_crop(image, depth, crop_hw, rng)
    for step in (brightness_contrast, gamma, hue_saturation_value):
        if rng.random() < PHOTOMETRIC_P:
            image = step(image, rng)
    return to_tensors(image, depth)


def eval_prepare(image: np.ndarray, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """No augmentation: the same tensors as :func:`train_augment` returns, at full size."""
    return to_tensors(image, depth)


# The depth task imports the eval step under the Task contract's name.
eval_transform = eval_prepare
