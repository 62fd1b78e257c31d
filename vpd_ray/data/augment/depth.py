"""NYUv2 depth augmentation, as the VPD reference applies it (GLPDepth's pipeline).

Reference order, on the uint8 480x640 RGB image and the float32 metre depth:
CutDepth (on a quarter of the samples) -> horizontal flip (p 0.5) -> random crop ->
brightness/contrast (p 0.5, limits 0.2, brightness relative to 255) -> gamma (p 0.5, 0.8..1.2)
-> hue/saturation/value (p 0.5, shifts 20/30/20 in OpenCV's 8-bit HSV) -> to tensors (/255).
Photometric steps touch the image only; flip and crop apply to both.

Where each part runs: CutDepth, flip and crop on the CPU (:func:`train_augment`, in the loader); the
photometric steps come last, touch nothing the CPU needs, and cost most of a sample's CPU time (an HSV
round trip), so the transform only draws their parameters (:func:`draw_photometric`, same draws in the
same order as the reference) and the batch gets them on the training device after the copy
(:func:`photometric`, via ``DepthTask.augment_on_device``), the image crossing as uint8. Under
``data.jpeg_decode: device`` the loader only draws the geometry (:func:`draw_geometry`) and the device
applies it after decoding, with the same :func:`place_image` (:mod:`vpd_ray.data.device_decode`).

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

from vpd_ray.data.augment.crop import crop_window
from vpd_ray.data.augment.color import apply_lut, hsv8_to_rgb, identity_lut, per_sample, rgb_to_hsv8
from vpd_ray.data.device_decode import DeferredImage, PendingImage, finish_images as finish_pending, place_or_defer

CUTDEPTH_P = 0.25
CUTDEPTH_MAX_SHARE = 0.75  # the reference's p: the strip is at most 3/4 of the width to its right
FLIP_P = PHOTOMETRIC_P = 0.5
BRIGHTNESS_LIMIT = CONTRAST_LIMIT = 0.2
GAMMA_RANGE = (0.8, 1.2)
HUE_SHIFT, SAT_SHIFT, VAL_SHIFT = 20, 30, 20
# draw_photometric's vector: each step's on-flag (0/1) and values; brightness in 8-bit levels (beta * 255).
PHOTOMETRIC_FIELDS = ("contrast_brightness_on", "contrast", "brightness", "gamma_on", "gamma",
                      "hsv_on", "hue_shift", "saturation_shift", "value_shift")


def cut_depth_strip(width: int, rng: np.random.Generator) -> tuple[int, int]:
    """CutDepth's strip, ``(left, columns)``: the reference's two draws."""
    alpha, beta = rng.random(), rng.random()
    return int(alpha * width), int(max((width - alpha * width) * beta * CUTDEPTH_MAX_SHARE, 1))


def cut_depth(image: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace a random vertical strip of all three channels by the depth (uint8-truncated metres)."""
    left, strip = cut_depth_strip(image.shape[1], rng)
    out = image.copy()
    out[:, left:left + strip, :] = depth[:, left:left + strip, None].astype(np.uint8)
    return out


def crop_corner(hw: tuple[int, int], crop_hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """A random crop's top-left corner; a crop larger than the sample is a ValueError."""
    (height, width), (ch, cw) = hw, crop_hw
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} is larger than the {height}x{width} sample")
    return int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1))


def random_crop(image: np.ndarray, depth: np.ndarray, crop_hw: tuple[int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    top, left = crop_corner(depth.shape, crop_hw, rng)
    return image[top:top + crop_hw[0], left:left + crop_hw[1]], depth[top:top + crop_hw[0], left:left + crop_hw[1]]


def draw_photometric(rng: np.random.Generator) -> np.ndarray:
    """The photometric steps' parameters, float64 ``[9]`` (see :data:`PHOTOMETRIC_FIELDS`), drawn from ``rng``
    exactly as the reference's steps draw them: each step on with p 0.5, then its values.

    Drawn here, in the CPU transform, so the sample's stream of draws (and so seeding and resume) is the
    reference's; :func:`photometric` applies them on the device. float64, as the reference's LUTs use them.
    """
    params = np.zeros(len(PHOTOMETRIC_FIELDS))
    if rng.random() < PHOTOMETRIC_P:
        alpha = 1.0 + rng.uniform(-CONTRAST_LIMIT, CONTRAST_LIMIT)
        params[0:3] = 1, alpha, rng.uniform(-BRIGHTNESS_LIMIT, BRIGHTNESS_LIMIT) * 255
    if rng.random() < PHOTOMETRIC_P:
        params[3:5] = 1, rng.uniform(*GAMMA_RANGE)
    if rng.random() < PHOTOMETRIC_P:
        params[5:9] = 1, rng.uniform(-HUE_SHIFT, HUE_SHIFT), rng.uniform(-SAT_SHIFT, SAT_SHIFT), \
            rng.uniform(-VAL_SHIFT, VAL_SHIFT)
    return params


def _level_lut(params: torch.Tensor) -> torch.Tensor:
    """Brightness/contrast then gamma as one 8-bit lookup table per sample ``[B, 256]`` (whole values).

    Each reference step is a uint8 -> uint8 table (contrast/brightness in float32, gamma in float64, both
    truncated), so applying the second to the first's entries is the two steps applied in turn.
    """
    ramp = identity_lut(len(params), params.device)
    alpha, beta, gamma = params[:, 1, None], params[:, 2, None], params[:, 4, None]
    levels = per_sample(params[:, 0], (ramp * alpha.float() + beta.float()).clamp(0, 255).trunc(), ramp)
    return per_sample(params[:, 3], ((levels.double() / 255.0) ** gamma * 255).trunc().float(), levels)


def _shift_hsv(rgb: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The reference's hue/saturation/value step: ``[B,3,H,W]`` whole RGB values, ``[B,3]`` shifts (dh, ds, dv)."""
    h, s, v = rgb_to_hsv8(rgb).unbind(1)
    dh, ds, dv = (shifts[:, i, None, None].float() for i in range(3))
    hsv = [torch.remainder(h + dh, 180), (s + ds).clamp(0, 255), (v + dv).clamp(0, 255)]
    return hsv8_to_rgb(torch.stack(hsv, 1).trunc())


def photometric(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The photometric steps on a batch, where it lies (the training device): uint8 ``[B,3,H,W]`` and
    :func:`draw_photometric`'s ``[B,9]`` -> float32 ``[B,3,H,W]`` of whole values 0..255.

    Every step runs on every sample and a sample's flag picks the result, so nothing reads a value on
    the host; a sample's result does not depend on the rest of the batch.
    """
    x = apply_lut(images, _level_lut(params))
    return per_sample(params[:, 5], _shift_hsv(x, params[:, 6:9]), x)


def to_tensors(image: np.ndarray, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 + float HxW -> uint8 [3,H,W] and float32 [1,H,W] metres (contiguous copies)."""
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    depth_t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    return image_t, depth_t


def draw_geometry(hw: tuple[int, int], rng: np.random.Generator,
                  crop_hw: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """CutDepth, flip and crop of one sample, drawn in the reference's order: ``(flip, top, left, cut
    start, cut stop)``, the CutDepth strip in the crop's columns (start >= stop: none).

    The strip is placed where it lands after the flip: the same pixels as cutting the whole image first,
    without copying it (a third of a sample's CPU time on a quarter of the samples).
    """
    width = hw[1]
    strip = cut_depth_strip(width, rng) if rng.random() < CUTDEPTH_P else (0, 0)
    flip = rng.random() < FLIP_P
    top, left = crop_corner(hw, crop_hw, rng)
    start, stop = (width - strip[0] - strip[1], width - strip[0]) if flip else (strip[0], strip[0] + strip[1])
    return int(flip), top, left, max(start - left, 0), min(stop - left, crop_hw[1])


def crop_flipped(x: np.ndarray | torch.Tensor, geometry: tuple[int, ...], crop_hw: tuple[int, int]) -> torch.Tensor:
    """The crop ``[..., h, w]`` of ``x`` ``[..., H, W]`` flipped when ``geometry`` says so, as a new tensor:
    the mirrored window is copied and flipped, never the whole of ``x``."""
    flip, top, left = geometry[:3]
    if flip:
        left = x.shape[-1] - left - crop_hw[1]
    return crop_window(x, top, left, crop_hw, bool(flip))


def place_image(image: np.ndarray | torch.Tensor, depth: torch.Tensor, geometry: tuple[int, ...]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` (any strides; numpy, or a tensor on any device) -> its crop ``[3, h, w]`` with
    CutDepth's strip from the cropped ``depth`` ``[1, h, w]`` metres: the loader's step and, under
    ``data.jpeg_decode: device``, the device's after decoding."""
    out = crop_flipped(image, geometry, tuple(depth.shape[-2:]))
    start, stop = geometry[3:]
    if start < stop:
        out[:, :, start:stop] = depth[:, :, start:stop].to(torch.uint8)  # truncated metres, as numpy's astype
    return out


def train_augment(
    image: np.ndarray | DeferredImage, depth: np.ndarray, rng: np.random.Generator, crop_hw: tuple[int, int] = (480, 480),
) -> tuple[torch.Tensor | PendingImage, torch.Tensor, torch.Tensor]:
    """VPD's NYU train augmentation, the CPU part: ``(uint8 [H,W,3], float32 [H,W] m) -> (uint8 [3,h,w],
    [1,h,w] m, photometric parameters float64 [9])``; :func:`photometric` finishes the image on the device.
    An image the loader left encoded comes back pending, with its geometry (:mod:`vpd_ray.data.device_decode`)."""
    if image.shape[:2] != depth.shape:
        raise ValueError(f"image {image.shape[:2]} and depth {depth.shape} differ in size")
    geometry = draw_geometry(depth.shape, rng, crop_hw)
    depth_t = crop_flipped(np.asarray(depth, dtype=np.float32)[None], geometry, crop_hw)
    image_t = place_or_defer(image, geometry, lambda pixels: place_image(pixels.transpose(2, 0, 1), depth_t, geometry))
    return image_t, depth_t, torch.from_numpy(draw_photometric(rng))


def finish_images(images: torch.Tensor | list[PendingImage], depth: torch.Tensor) -> torch.Tensor:
    """A train batch's uint8 images ``[B,3,h,w]`` where ``depth`` ``[B,1,h,w]`` lies, those left encoded
    decoded there and placed (:func:`place_image`, with their CutDepth from the cropped depth)."""
    return finish_pending(images, depth.device, lambda i, image, geometry: place_image(image, depth[i], geometry))


def eval_prepare(image: np.ndarray, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """No augmentation, at full size: float32 ``[3,H,W]`` in [0,1] (evaluation takes no device step) and
    ``[1,H,W]`` metres."""
    image_t, depth_t = to_tensors(image, depth)
    return image_t.float().div_(255), depth_t


# The depth task imports the eval step under the Task contract's name.
eval_transform = eval_prepare
