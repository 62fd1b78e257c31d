"""Photometric augmentation on the device equals the CPU reference it replaced.

The numpy functions below are the product's former CPU implementation (VPD's NYU steps as
albumentations' LUT formulas, mmseg's ``PhotoMetricDistortion``, OpenCV's 8-bit HSV), kept here only
as the reference. The product now draws the parameters in the CPU transform (same draws, same order)
and applies them to the collated batch with torch ops (``Task.augment_on_device``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpd_ray.data.augment import color, depth as depth_aug, seg as seg_aug
from vpd_ray.tasks.depth import DepthConfig, DepthTask
from vpd_ray.tasks.seg import SegConfig, SegTask


# --- the reference: the former numpy implementation -----------------------------------------------

def ref_rgb_to_hsv8(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float32)
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta * 255 / np.maximum(v, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    h = np.where(v == r, (g - b) / d * 60, np.where(v == g, 120 + (b - r) / d * 60, 240 + (r - g) / d * 60))
    h = np.where(delta > 0, np.mod(h, 360), 0) / 2
    return np.stack([np.round(h) % 180, np.round(s), v], -1).astype(np.uint8)


def ref_hsv8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) * 2 / 60
    s, v = hsv[..., 1] / np.float32(255), hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = [np.choose(sector, [row[c] for row in table]) for c in range(3)]
    return np.clip(np.round(np.stack(rgb, -1)), 0, 255).astype(np.uint8)


def ref_brightness_contrast(image, alpha, beta):
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta * 255, 0, 255).astype(np.uint8)[image]


def ref_gamma(image, g):
    return ((np.arange(256) / 255.0) ** g * 255).astype(np.uint8)[image]


def ref_hue_saturation_value(image, dh, ds, dv):
    hsv = ref_rgb_to_hsv8(image)
    ramp = np.arange(256, dtype=np.float32)
    luts = (np.mod(ramp + dh, 180), np.clip(ramp + ds, 0, 255), np.clip(ramp + dv, 0, 255))
    return ref_hsv8_to_rgb(np.stack([luts[c].astype(np.uint8)[hsv[..., c]] for c in range(3)], -1))


def ref_depth_train_augment(image, depth, rng, crop_hw):
    """The former ``train_augment``: CPU geometry, then the photometric steps drawing as they go."""
    if rng.random() < depth_aug.CUTDEPTH_P:
        image = depth_aug.cut_depth(image, depth, rng)
    if rng.random() < depth_aug.FLIP_P:
        image, depth = image[:, ::-1], depth[:, ::-1]
    image, depth = depth_aug.random_crop(image, depth, crop_hw, rng)
    if rng.random() < 0.5:
        image = ref_brightness_contrast(image, 1.0 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2))
    if rng.random() < 0.5:
        image = ref_gamma(image, rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        image = ref_hue_saturation_value(image, rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20))
    return image, depth


def ref_convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def ref_photometric_distortion(image, rng):
    """The former mmseg ``PhotoMetricDistortion`` (brightness 32, contrast/saturation 0.5..1.5, hue 18)."""
    if rng.integers(2):
        image = ref_convert(image, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = ref_convert(image, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = ref_rgb_to_hsv8(image)
        hsv[..., 1] = ref_convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = ref_hsv8_to_rgb(hsv)
    if rng.integers(2):
        hsv = ref_rgb_to_hsv8(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 18)) % 180
        image = ref_hsv8_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        image = ref_convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


# --- helpers ----------------------------------------------------------------------------------------

def _images(count: int, hw=(24, 32), seed=0) -> np.ndarray:
    """uint8 ``[N, H, W, 3]``: noise plus greys, saturated primaries and the extremes (HSV's edge cases)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *hw, 3), dtype=np.uint8)
    images[:, 0, :8] = np.array([[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0],
                                 [0, 0, 255], [255, 255, 0], [1, 0, 255]], dtype=np.uint8)
    return images


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _max_level_diff(device_out: torch.Tensor, reference: np.ndarray) -> int:
    """Largest difference in 8-bit levels; the device result must be whole values."""
    assert torch.equal(device_out, device_out.round())
    return int(np.abs(_nhwc(device_out).astype(np.int64) - reference.astype(np.int64)).max())


# --- the HSV conversions ------------------------------------------------------------------------------

def test_hsv_conversions_equal_the_numpy_reference():
    images = _images(4)
    hsv = color.rgb_to_hsv8(_nchw(images).float())
    assert np.array_equal(_nhwc(hsv), ref_rgb_to_hsv8(images))
    hsv_any = np.random.default_rng(1).integers(0, [180, 256, 256], (4, 24, 32, 3)).astype(np.uint8)
    assert np.array_equal(_nhwc(color.hsv8_to_rgb(_nchw(hsv_any).float())), ref_hsv8_to_rgb(hsv_any))


# --- depth: fixed parameters, the draws, batch independence ---------------------------------------

DEPTH_CASES = [  # (contrast/brightness, gamma, hue/saturation/value): None = step off
    (None, None, None),
    ((1.15, -0.12), None, None),
    (None, 0.83, None),
    (None, None, (-17.3, 25.1, -8.6)),
    ((0.81, 0.19), 1.19, (19.9, -29.5, 14.2)),
]


def _depth_params(bc, g, hsv) -> np.ndarray:
    return np.array([bc is not None, *(bc or (0, 0))[:1], (bc or (0, 0))[1] * 255, g is not None, g or 0,
                     hsv is not None, *(hsv or (0, 0, 0))], dtype=np.float64)


@pytest.mark.parametrize("bc, g, hsv", DEPTH_CASES)
def test_depth_photometric_equals_the_reference_for_fixed_parameters(bc, g, hsv):
    images = _images(3)
    expected = images
    if bc is not None:
        expected = ref_brightness_contrast(expected, *bc)
    if g is not None:
        expected = ref_gamma(expected, g)
    if hsv is not None:
        expected = np.stack([ref_hue_saturation_value(im, *hsv) for im in expected])
    params = torch.from_numpy(np.stack([_depth_params(bc, g, hsv)] * len(images)))
    assert _max_level_diff(depth_aug.photometric(_nchw(images), params), expected) <= 1


def test_depth_train_pipeline_equals_the_reference_sample_for_sample():
    """Same seed: the CPU part + the device part give the former CPU pipeline's image, and the same depth."""
    image = _images(1, (48, 64))[0]
    depth = np.random.default_rng(2).uniform(0.5, 9.5, (48, 64)).astype(np.float32)
    worst = 0
    for seed in range(40):
        ref_image, ref_depth = ref_depth_train_augment(image, depth, np.random.default_rng(seed), (32, 40))
        image_t, depth_t, params = depth_aug.train_augment(image, depth, np.random.default_rng(seed), (32, 40))
        assert image_t.dtype == torch.uint8 and image_t.shape == (3, 32, 40) and params.shape == (9,)
        assert np.array_equal(depth_t[0].numpy(), ref_depth)
        worst = max(worst, _max_level_diff(depth_aug.photometric(image_t[None], params[None]), ref_image[None]))
    assert worst <= 1


def test_depth_cpu_part_is_the_reference_geometry_exactly():
    """CutDepth applied to the crop after the flip gives the pixels of cutting the whole image first."""
    image = _images(1, (48, 64))[0]
    depth = np.random.default_rng(2).uniform(0.5, 9.5, (48, 64)).astype(np.float32)
    cut = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        ref = image
        if rng.random() < depth_aug.CUTDEPTH_P:
            ref, cut = depth_aug.cut_depth(image, depth, rng), cut + 1
        ref_depth = depth
        if rng.random() < depth_aug.FLIP_P:
            ref, ref_depth = ref[:, ::-1], depth[:, ::-1]
        ref, ref_depth = depth_aug.random_crop(ref, ref_depth, (32, 40), rng)
        image_t, depth_t, _ = depth_aug.train_augment(image, depth, np.random.default_rng(seed), (32, 40))
        assert np.array_equal(image_t.numpy(), ref.transpose(2, 0, 1)) and np.array_equal(depth_t[0].numpy(), ref_depth)
    assert 30 < cut < 70  # CutDepth on about a quarter of them


def _assert_spans(drawn: np.ndarray, lo: float, hi: float, name: str) -> None:
    """Draws of a uniform parameter reach both ends of ``[lo, hi]`` (within 2% of the range)."""
    assert lo <= drawn.min() < lo + 0.02 * (hi - lo) and hi - 0.02 * (hi - lo) < drawn.max() <= hi, name


def test_depth_parameters_follow_the_reference_distribution():
    params = np.stack([depth_aug.draw_photometric(np.random.default_rng(s)) for s in range(4000)])
    fields = dict(zip(depth_aug.PHOTOMETRIC_FIELDS, params.T))
    for flag, values, lo, hi in [("contrast_brightness_on", "contrast", 0.8, 1.2),
                                 ("contrast_brightness_on", "brightness", -0.2 * 255, 0.2 * 255),
                                 ("gamma_on", "gamma", 0.8, 1.2), ("hsv_on", "hue_shift", -20, 20),
                                 ("hsv_on", "saturation_shift", -30, 30), ("hsv_on", "value_shift", -20, 20)]:
        on = fields[flag] == 1
        assert set(np.unique(fields[flag])) == {0, 1} and 0.46 < on.mean() < 0.54, flag
        drawn = fields[values][on]
        _assert_spans(drawn, lo, hi, values)
        assert abs(drawn.mean() - (lo + hi) / 2) < 0.03 * (hi - lo), values  # uniform: centred
        assert (fields[values][~on] == 0).all()


def _assert_batched_is_per_sample(draw, apply) -> None:
    """``apply(images, params)`` on 6 samples at once equals it on each sample alone."""
    images = _nchw(_images(6))
    params = torch.from_numpy(np.stack([draw(np.random.default_rng(s)) for s in range(6)]))
    alone = torch.cat([apply(images[i:i + 1], params[i:i + 1]) for i in range(6)])
    assert torch.equal(apply(images, params), alone)


def test_depth_photometric_of_a_batch_is_that_of_each_sample():
    _assert_batched_is_per_sample(depth_aug.draw_photometric, depth_aug.photometric)


# --- segmentation: fixed parameters, the draws, batch independence, padding -----------------------

def _seg_params(brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None) -> np.ndarray:
    return np.array([brightness is not None, brightness or 0, contrast_first, contrast is not None, contrast or 0,
                     saturation is not None, saturation or 0, hue is not None, hue or 0], dtype=np.float64)


def _ref_distortion(images, brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None):
    out = []
    for image in images:
        if brightness is not None:
            image = ref_convert(image, beta=brightness)
        if contrast is not None and contrast_first:
            image = ref_convert(image, alpha=contrast)
        if saturation is not None:
            hsv = ref_rgb_to_hsv8(image)
            hsv[..., 1] = ref_convert(hsv[..., 1], alpha=saturation)
            image = ref_hsv8_to_rgb(hsv)
        if hue is not None:
            hsv = ref_rgb_to_hsv8(image)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + hue) % 180
            image = ref_hsv8_to_rgb(hsv)
        if contrast is not None and not contrast_first:
            image = ref_convert(image, alpha=contrast)
        out.append(image)
    return np.stack(out)


@pytest.mark.parametrize("case", [
    {}, {"brightness": -27.4}, {"contrast": 1.37, "contrast_first": True}, {"contrast": 0.61},
    {"saturation": 1.42}, {"hue": -18}, {"hue": 17},
    {"brightness": 30.2, "contrast": 0.55, "contrast_first": True, "saturation": 0.7, "hue": 9},
    {"brightness": -5.5, "contrast": 1.49, "saturation": 1.3, "hue": -11},
])
def test_seg_distortion_equals_the_reference_for_fixed_parameters(case):
    images = _images(3)
    params = torch.from_numpy(np.stack([_seg_params(**case)] * len(images)))
    out = seg_aug.photometric_distortion(_nchw(images), params)
    assert _max_level_diff(out, _ref_distortion(images, **case)) <= 1


def test_seg_draws_are_the_reference_draws():
    """Same seed, same rng position afterwards and the same image: the draws and their order are mmseg's."""
    image = _images(1)[0]
    worst = 0
    for seed in range(40):
        rng_ref, rng_new = np.random.default_rng(seed), np.random.default_rng(seed)
        expected = ref_photometric_distortion(image, rng_ref)
        params = torch.from_numpy(seg_aug.draw_distortion(rng_new))
        assert rng_ref.random() == rng_new.random()
        worst = max(worst, _max_level_diff(seg_aug.photometric_distortion(_nchw(image[None]), params[None]),
                                           expected[None]))
    assert worst <= 1


def test_seg_parameters_follow_the_reference_distribution():
    params = np.stack([seg_aug.draw_distortion(np.random.default_rng(s)) for s in range(4000)])
    fields = dict(zip(seg_aug.DISTORTION_FIELDS, params.T))
    for flag in ("brightness_on", "contrast_first", "contrast_on", "saturation_on", "hue_on"):
        assert set(np.unique(fields[flag])) == {0, 1} and 0.46 < fields[flag].mean() < 0.54, flag
    for flag, values, lo, hi in [("brightness_on", "brightness", -32, 32), ("contrast_on", "contrast", 0.5, 1.5),
                                 ("saturation_on", "saturation", 0.5, 1.5)]:
        drawn = fields[values][fields[flag] == 1]
        _assert_spans(drawn, lo, hi, values)
    hue = fields["hue_shift"][fields["hue_on"] == 1]
    assert set(np.unique(hue)) == set(range(-18, 18))  # mmseg's randint(-18, 18): 18 itself never


def test_seg_distortion_of_a_batch_is_that_of_each_sample():
    _assert_batched_is_per_sample(seg_aug.draw_distortion, seg_aug.photometric_distortion)


# --- the task hooks -------------------------------------------------------------------------------

def _depth_sample(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
            "depth": rng.uniform(0.5, 9.5, (40, 56)).astype(np.float32), "meta": {"class_id": 2}}


def _seg_sample(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
            "label": rng.integers(0, 4, (40, 60)).astype(np.uint8)}


@pytest.mark.parametrize("task, sample", [
    (DepthTask(DepthConfig(crop_size=[32, 48])), _depth_sample),
    (SegTask(SegConfig(num_classes=6, scale=[128, 32], ratio_range=[0.8, 1.2], crop_size=[48, 48])), _seg_sample),
])
def test_hook_gives_each_sample_what_the_cpu_would_before_collate(task, sample):
    """A sample's image is the same whether its device step ran alone (on the CPU, before collation)
    or in the batch after it; the result is the float [0, 1] image the backbone takes."""
    outs = [task.train_transform(sample(s), np.random.default_rng(s)) for s in range(4)]
    assert all(o["image"].dtype == torch.uint8 for o in outs)
    batch = task.augment_on_device(torch.utils.data.default_collate(outs))
    alone = [task.augment_on_device(torch.utils.data.default_collate([o]))["image"][0] for o in outs]
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert torch.equal(batch["image"], torch.stack(alone))


def test_seg_hook_pads_the_image_with_half_grey_outside_the_crop():
    task = SegTask(SegConfig(num_classes=6, scale=[128, 32], ratio_range=[1.0, 1.0], crop_size=[48, 48]))
    out = task.train_transform(_seg_sample(0), np.random.default_rng(0))  # 40x60 -> 32x48: rows 32.. are padding
    assert out["image_hw"].tolist() == [32, 48] and (out["label"][32:] == 255).all()
    image = task.augment_on_device(torch.utils.data.default_collate([out]))["image"][0]
    assert (image[:, 32:] == 0.5).all() and (image[:, :32] != 0.5).any()


def test_hook_leaves_a_batch_without_parameters_alone():
    batch = {"image": torch.rand(2, 3, 8, 8)}
    for task in (DepthTask(DepthConfig()), SegTask(SegConfig())):
        assert task.augment_on_device(batch) is batch
