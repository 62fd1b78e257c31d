"""ADE20K training augmentation, step for step as mmseg's pipeline in the reference config.

``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`` -> ``RandomCrop(512, cat_max_ratio=0.75)``
-> ``RandomFlip(0.5)`` -> ``PhotoMetricDistortion`` -> ``Pad(512, seg_pad_val=255)``. Images are
uint8 ``HxWx3`` numpy arrays and labels uint8 ``HxW`` until the final float conversion.

Where each part runs: resize, crop (it looks at the label), flip and the label padding on the CPU
(:func:`seg_train_augment`, in the loader); the photometric distortion, which touches the image only and
is most of a sample's CPU time (two HSV round trips), is drawn there (:func:`draw_distortion`, mmseg's
draws in mmseg's order) and applied on the training device after the copy (:func:`photometric_distortion`
and :func:`fill_padding`, via ``SegTask.augment_on_device``); image and label cross as uint8. The label is
resized only inside the crops drawn (:func:`draw_rescale_crop`), the same pixels as resizing it whole. Under
``data.jpeg_decode: device`` the image's resize, crop, flip and padding wait for the device too
(:func:`place_decoded`, the loader's crop and pad after the device's resize). Resizing
goes through ``torch.nn.functional.interpolate`` (bilinear without antialiasing for images,
floor-nearest for labels), which is what OpenCV's ``INTER_LINEAR`` / ``INTER_NEAREST`` compute;
Pillow's bilinear would low-pass filter on downscaling and shift the statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vpd_ray.data.augment.color import (
    against,
    apply_lut,
    hsv8_to_rgb,
    identity_lut,
    per_sample,
    rgb_to_hsv8,
)
from vpd_ray.data.augment.crop import crop_window, pad_to
from vpd_ray.data.device_decode import DeferredImage, PendingImage, finish_images as finish_pending, place_or_defer

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's shift: 0 ("other") -> 255 (ignored), k -> k - 1 for k in 1..150: uint8 arithmetic wraps 0 to 255."""
    return label.astype(np.uint8, copy=False) - np.uint8(1)


def rescale_size(hw: tuple[int, int], scale: Sequence[int]) -> tuple[int, int]:
    """Keep-ratio target size: the largest ``hw`` fitting ``max(scale)`` x ``min(scale)`` (mmcv ``imrescale``)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``HxWx3`` image (OpenCV ``INTER_LINEAR`` semantics, within one level).

    torch's uint8 kernel on a channels-last layout: no float copy of an image that may be upscaled to
    1024x1366, several times faster than resizing in float. Its fixed-point weights round like OpenCV's
    own: both are within one 8-bit level of the exact float result. The image goes in with a fourth
    channel (:func:`_four_channels`) because the kernel's 4-channel path is 2x faster than its 3-channel
    one, which unpacks every pixel; channels do not mix, so the three returned are the 3-channel result
    exactly.
    """
    if image.shape[:2] == tuple(hw):
        return image
    rgbx = _four_channels(image)
    # [1,4,H,W] over the HWC memory, with the strides of a channels-last tensor in every dim: a batch dim added
    # after the permute (stride 4) sends the kernel down its generic path, 2-3x slower
    x = torch.from_numpy(rgbx.reshape(1, *rgbx.shape)).permute(0, 3, 1, 2)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()[..., :3]


def _four_channels(image: np.ndarray) -> np.ndarray:
    """``[H, W, 4]`` pixels of a uint8 ``[H, W, 3]`` image: the array it is the RGB view of, as a decoded
    colour JPEG is (:func:`vpd_ray.data.decode.decode_image`), else a padded copy (1-2 ms for ADE20K)."""
    base = image.base
    if (isinstance(base, np.ndarray) and base.dtype == np.uint8 and base.shape == (*image.shape[:2], 4)
            and base.flags.c_contiguous and image.strides == base.strides and base.ctypes.data == image.ctypes.data):
        return base
    return F.pad(torch.from_numpy(np.ascontiguousarray(image)), (0, 1)).numpy()


def nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    """int64 ``[out_len]``: the source index of each output index of a nearest resize (OpenCV's
    ``INTER_NEAREST``), by torch's own formula for ``mode="nearest"`` (``nearest_idx`` in its UpSample.h:
    ``floor(i * (float)in / out)`` in float32, an exact halving for 2x), so a gather with them equals
    ``F.interpolate`` exactly (tests/test_seg.py checks it over many sizes)."""
    if out_len == in_len:
        return np.arange(out_len)
    if out_len == 2 * in_len:
        return np.arange(out_len) >> 1
    scale = np.float32(in_len) / np.float32(out_len)
    return np.minimum(np.floor(np.arange(out_len, dtype=np.float32) * scale).astype(np.int64), in_len - 1)


def draw_crop(
    hw: tuple[int, int],
    rng: np.random.Generator,
    crop_hw: tuple[int, int],
    label_at: Callable[[int, int], np.ndarray],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int]:
    """mmseg ``RandomCrop``'s top-left corner in an image of size ``hw``: up to 10 re-draws while one class
    fills ``>= cat_max_ratio`` of the crop's labels (``label_at(y, x)``). After 10 rejected crops the 11th
    is taken as it comes, as in mmseg."""
    ch, cw = crop_hw

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(hw[0] - ch, 0) + 1)), int(rng.integers(0, max(hw[1] - cw, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            # torch's bincount takes uint8 as it is, 2x faster than numpy's (which widens it to int64 first)
            counts = torch.bincount(torch.from_numpy(label_at(y, x)).ravel(), minlength=ignore_index + 1).numpy()
            counts[ignore_index] = 0
            counts = counts[counts > 0]  # the classes present, as mmseg's np.unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_hw: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop`` of an image and its label (:func:`draw_crop`)."""
    ch, cw = crop_hw
    y, x = draw_crop(label.shape, rng, crop_hw, lambda y, x: label[y : y + ch, x : x + cw], cat_max_ratio, ignore_index)
    return image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def draw_rescale_crop(
    hw: tuple[int, int],
    label: np.ndarray,
    rng: np.random.Generator,
    scale: Sequence[int],
    ratio_range: Sequence[float],
    crop_hw: tuple[int, int],
    cat_max_ratio: float = 0.75,
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """mmseg ``Resize`` with ``ratio_range`` (scale ``* U(ratio_range)``, then keep-ratio rescale), then
    ``RandomCrop``, drawn for an image of size ``hw`` with its ``label``: ``((resized h, resized w, top,
    left), the label's crop)``. The label is resized only inside each crop drawn (a nearest resize is a
    gather, :func:`nearest_indices`), the same pixels as resizing it whole, which is most of the work for
    an image upscaled to 1024x1366 and cropped to 512x512."""
    ratio = rng.uniform(*ratio_range)
    size = rescale_size(hw, (int(scale[0] * ratio), int(scale[1] * ratio)))
    rows, cols = nearest_indices(label.shape[0], size[0]), nearest_indices(label.shape[1], size[1])
    ch, cw = crop_hw

    @functools.lru_cache(maxsize=1)  # the accepted crop was just checked: its labels are kept
    def label_at(y: int, x: int) -> np.ndarray:
        return label.take(rows[y : y + ch], axis=0).take(cols[x : x + cw], axis=1)

    y, x = draw_crop(size, rng, crop_hw, label_at, cat_max_ratio)
    return (*size, y, x), label_at(y, x)


DISTORTION_FIELDS = ("brightness_on", "brightness", "contrast_first", "contrast_on", "contrast",
                     "saturation_on", "saturation", "hue_on", "hue_shift")


def draw_distortion(
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``'s parameters, float64 ``[9]`` (:data:`DISTORTION_FIELDS`), drawn from
    ``rng`` in mmseg's order: brightness, contrast (before or after), saturation, hue; each on with p 0.5.

    The contrast coin is only tossed on the side ``contrast_first`` picked, as in mmseg; its ``randint(-18,
    18)`` hue shift excludes 18. :func:`photometric_distortion` applies them on the device.
    """
    params = np.zeros(len(DISTORTION_FIELDS))
    if rng.integers(2):
        params[0:2] = 1, rng.uniform(-brightness_delta, brightness_delta)
    params[2] = contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        params[3:5] = 1, rng.uniform(*contrast_range)
    if rng.integers(2):
        params[5:7] = 1, rng.uniform(*saturation_range)
    if rng.integers(2):
        params[7:9] = 1, rng.integers(-hue_delta, hue_delta)
    if not contrast_first and rng.integers(2):
        params[3:5] = 1, rng.uniform(*contrast_range)
    return params


def _convert(x: torch.Tensor, alpha: torch.Tensor | float = 1.0, beta: torch.Tensor | float = 0.0) -> torch.Tensor:
    """mmseg's ``convert`` on whole 8-bit values: affine in float32, clip, truncate (``astype(uint8)``).

    ``alpha`` / ``beta`` broadcast per sample; float64 parameters are rounded to float32 first, as numpy
    does with a Python float against a float32 image.
    """
    alpha = alpha.float() if torch.is_tensor(alpha) else alpha
    beta = beta.float() if torch.is_tensor(beta) else beta
    return (x * alpha + beta).clamp(0, 255).trunc()


def _with_hsv_channel(rgb: torch.Tensor, channel: int, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """An RGB -> 8-bit HSV -> RGB round trip that changes one HSV channel ``[B,H,W]``."""
    hsv = rgb_to_hsv8(rgb)
    hsv[:, channel] = change(hsv[:, channel])
    return hsv8_to_rgb(hsv)


def photometric_distortion(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` on a batch where it lies (the training device): uint8 ``[B,3,H,W]`` and
    :func:`draw_distortion`'s ``[B,9]`` -> float32 ``[B,3,H,W]`` of whole values 0..255.

    Brightness and contrast are 8-bit lookup tables (the contrast that comes first joins the brightness
    table); saturation and hue are separate HSV round trips, as in mmseg. Every step runs on every
    sample and the flags pick (no host reads); a sample's result does not depend on the batch.
    """
    field = params.unbind(1)  # DISTORTION_FIELDS, each per sample [B]
    ramp = identity_lut(len(params), params.device)
    levels = per_sample(field[0], _convert(ramp, beta=against(field[1], ramp)), ramp)
    contrast_first, contrast_last = field[3] * field[2], field[3] * (1 - field[2])
    x = apply_lut(images, per_sample(contrast_first, _convert(levels, alpha=against(field[4], ramp)), levels))
    x = per_sample(field[5], _with_hsv_channel(x, 1, lambda s: _convert(s, alpha=against(field[6], s))), x)
    hue = lambda h: torch.remainder(h + against(field[8], h).float(), 180)
    x = per_sample(field[7], _with_hsv_channel(x, 0, hue), x)
    return apply_lut(x, per_sample(contrast_last, _convert(ramp, alpha=against(field[4], ramp)), ramp))


def fill_padding(images: torch.Tensor, image_hw: torch.Tensor, value: float = 0.5) -> torch.Tensor:
    """Set ``[B,3,H,W]`` outside each sample's top-left ``image_hw`` ``[B,2]`` to ``value`` (no host reads).

    The reference pads after normalising to [-1, 1] with 0, which is 0.5 of the [0, 1] image; a uint8 copy
    cannot hold 0.5, so the CPU pads with 0 and this sets it on the device.
    """
    rows = torch.arange(images.shape[-2], device=images.device)[None, :, None] < image_hw[:, 0, None, None]
    cols = torch.arange(images.shape[-1], device=images.device)[None, None, :] < image_hw[:, 1, None, None]
    return torch.where((rows & cols)[:, None], images, value)


def crop_and_pad(resized: np.ndarray | torch.Tensor, geometry: tuple[int, ...],
                 crop_hw: tuple[int, int]) -> torch.Tensor:
    """The crop and flip of ``geometry`` (:func:`seg_train_augment`) of a resized uint8 ``[3, H, W]`` image,
    padded with 0 to ``crop_hw`` (:func:`fill_padding` sets the padding on the device)."""
    _, _, y, x, flip = geometry
    return pad_to(crop_window(resized, y, x, crop_hw, bool(flip)), crop_hw, 0)


def resize_tensor(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 ``[3, H, W]`` image where it lies. On the CPU: torch's uint8 kernel, the
    loader's (:func:`resize_image`), the same values; elsewhere :func:`resize_rounded`."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    if image.device.type == "cpu":
        return F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False)[0]
    return resize_rounded(image, hw)


def resize_rounded(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """CUDA has no uint8 bilinear kernel: float32, rounded, within one 8-bit level of the uint8 kernel's
    result (both are within one level of the exact one)."""
    resized = F.interpolate(image[None].float(), size=hw, mode="bilinear", align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def place_decoded(image: torch.Tensor, geometry: tuple[int, ...], crop_hw: tuple[int, int]) -> torch.Tensor:
    """The loader's resize, crop, flip and pad of :func:`seg_train_augment` on a decoded uint8 ``[3, H, W]``
    image, where it lies (``data.jpeg_decode: device``)."""
    return crop_and_pad(resize_tensor(image, tuple(geometry[:2])), geometry, crop_hw)


def finish_images(images: torch.Tensor | list[PendingImage], device: torch.device,
                  crop_hw: tuple[int, int]) -> torch.Tensor:
    """A train batch's uint8 images ``[B,3,*crop_hw]`` on ``device``, those left encoded decoded there
    and placed (:func:`place_decoded`)."""
    return finish_pending(images, device, lambda _, image, geometry: place_decoded(image, geometry, crop_hw))


def seg_train_augment(
    image: np.ndarray | DeferredImage,
    label: np.ndarray,
    rng: np.random.Generator,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    crop_hw: tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
) -> dict[str, torch.Tensor | PendingImage]:
    """The training pipeline's CPU part on an already label-shifted sample: ``image`` uint8 ``[3,h,w]``,
    ``label`` uint8 ``[h,w]``, ``image_hw`` int64 ``[2]`` and ``photometric`` float64 ``[9]``; the distortion
    and the image padding happen on the device (``SegTask.augment_on_device``). An image the loader left
    encoded comes back pending, with its geometry (resized h, w, top, left, flip;
    :mod:`vpd_ray.data.device_decode`)."""
    (*size, y, x), label = draw_rescale_crop(image.shape[:2], label, rng, scale, ratio_range, crop_hw, cat_max_ratio)
    flip = rng.random() < 0.5
    params = torch.from_numpy(draw_distortion(rng))
    geometry = (*size, y, x, int(flip))

    def place(pixels: np.ndarray) -> torch.Tensor:  # the loader's resize (resize_image), the shared crop and pad
        return crop_and_pad(resize_image(pixels, tuple(size)).transpose(2, 0, 1), geometry, crop_hw)

    return {"image": place_or_defer(image, geometry, place),
            "label": pad_to(crop_window(label, 0, 0, label.shape, flip), crop_hw, IGNORE_INDEX),
            "image_hw": torch.tensor(label.shape), "photometric": params}
