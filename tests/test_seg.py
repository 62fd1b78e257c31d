"""Segmentation: Semantic FPN head, mIoU accumulator, ADE20K augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpd_ray.data.augment.seg import (
    draw_distortion,
    nearest_indices,
    photometric_distortion,
    random_crop,
    reduce_zero_label,
    draw_rescale_crop,
    rescale_size,
    resize_image,
    seg_train_augment,
)
from vpd_ray.metrics.seg import SegMetric, intersect_and_union
from vpd_ray.model.heads.seg import SemanticFPNHead

TINY_INFO = [{"num_chs": 8, "reduction": 8}, {"num_chs": 16 + 5, "reduction": 16},
             {"num_chs": 32 + 5, "reduction": 32}, {"num_chs": 32, "reduction": 64}]  # fmt: skip


def _feats(batch: int, padded_hw: tuple[int, int]) -> list[torch.Tensor]:
    h, w = padded_hw
    return [torch.randn(batch, i["num_chs"], h // i["reduction"], w // i["reduction"]) for i in TINY_INFO]


def test_fpn_head_logits_cover_the_unpadded_image_and_train():
    head = SemanticFPNHead(TINY_INFO, num_classes=7, neck_channels=16, channels=8)
    feats = _feats(2, (128, 128))  # a 128x96 image padded to 128x128
    logits = head(feats, (128, 96))
    assert logits.shape == (2, 7, 128, 96)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_fpn_head_scale_heads_follow_mmseg_depths():
    head = SemanticFPNHead(TINY_INFO, num_classes=3, neck_channels=16, channels=8)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in sh.modules()) for sh in head.head.scale_heads]
    assert convs == [1, 1, 2, 3]  # max(1, log2(stride / 8)) blocks per level


def test_fpn_head_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        SemanticFPNHead(TINY_INFO, num_classes=0)


def test_intersect_and_union_matches_hand_computed_confusion():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    # kept pixels (label != 255): pairs (l,p) = (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2)
    areas = intersect_and_union(pred, label, num_classes=3)
    intersect, union, area_pred, area_label = areas.tolist()
    assert intersect == [1, 2, 1]
    assert area_pred == [2, 3, 2]
    assert area_label == [2, 3, 2]
    assert union == [3, 4, 3]


def test_seg_metric_miou_aacc_and_absent_classes():
    metric = SegMetric(num_classes=4, class_names=["a", "b", "c", "d"])
    metric.update(torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 2]]]), {"label": torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])})
    out = metric.compute()
    assert out["mIoU"] == pytest.approx((1 / 3 + 2 / 4 + 1 / 3) / 3)  # class "d" never occurs: not averaged
    assert out["aAcc"] == pytest.approx(4 / 7)
    assert out["IoU.b"] == pytest.approx(0.5)
    assert np.isnan(out["IoU.d"])


def test_seg_metric_sums_over_images_before_dividing():
    metric = SegMetric(num_classes=2)
    metric.update(torch.zeros(1, 1, 4, dtype=torch.long), {"label": torch.tensor([[[0, 0, 0, 1]]])})
    metric.update(torch.ones(1, 1, 4, dtype=torch.long), {"label": torch.tensor([[[1, 1, 1, 1]]])})
    # class 1: I = 4, U = 1 + 4 = 5 (summed), not the mean of per-image IoUs (0 and 1)
    assert metric.compute()["IoU.1"] == pytest.approx(4 / 5)


def test_seg_metric_distributed_states_sum_to_single_process():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 5, (2, 8, 8), generator=gen), torch.randint(0, 6, (2, 8, 8), generator=gen)) for _ in range(4)]
    batches = [(p, torch.where(lab == 5, 255, lab)) for p, lab in batches]
    single, ranks = SegMetric(5), [SegMetric(5), SegMetric(5)]
    for i, (pred, label) in enumerate(batches):
        single.update(pred, {"label": label})
        ranks[i % 2].update(pred, {"label": label})
    merged = SegMetric(5)
    merged.load_state(ranks[0].state() + ranks[1].state())  # what an all-reduce(SUM) does
    assert merged.compute() == pytest.approx(single.compute(), nan_ok=True)
    assert single.state().dtype == torch.float64 and single.state().dim() == 1


def test_reduce_zero_label_shifts_and_ignores_other():
    out = reduce_zero_label(np.array([[0, 1, 150, 2]], dtype=np.uint8))
    assert out.tolist() == [[255, 0, 149, 1]]


@pytest.mark.parametrize(("hw", "scale", "expected"), [((512, 683), (2048, 512), (512, 683)),
                                                        ((256, 256), (2048, 512), (512, 512)),
                                                        ((100, 1000), (2048, 512), (205, 2048))])  # fmt: skip
def test_rescale_size_keeps_ratio_inside_the_scale(hw, scale, expected):
    assert rescale_size(hw, scale) == expected


def _share_balanced(cat_max_ratio: float) -> float:
    """Share of crops (over many seeds) in which no class fills 75% or more, on a half/half label."""
    label = np.zeros((32, 128), dtype=np.uint8)
    label[:, 64:] = 1
    image = np.zeros((32, 128, 3), dtype=np.uint8)
    ok = 0
    for seed in range(200):
        _, crop = random_crop(image, label, np.random.default_rng(seed), (32, 32), cat_max_ratio)
        ok += np.bincount(crop.ravel(), minlength=2).max() / crop.size < 0.75
    return ok / 200


def test_random_crop_cat_max_ratio_redraws_single_class_crops():
    # one draw is balanced with p ~ 0.16; with up to 10 redraws it is balanced with p ~ 0.85
    assert _share_balanced(1.0) < 0.3
    assert _share_balanced(0.75) > 0.7


def _resize_all_then_crop(image, label, rng, scale, ratio_range, crop_hw):
    """mmseg's order done plainly: resize the whole image (3 channels) and label with torch, then crop."""
    import torch.nn.functional as F

    ratio = rng.uniform(*ratio_range)
    hw = rescale_size(image.shape[:2], (int(scale[0] * ratio), int(scale[1] * ratio)))
    image = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(), size=hw, mode="bilinear",
                          align_corners=False)[0].permute(1, 2, 0).numpy()
    label = F.interpolate(torch.from_numpy(label)[None, None], size=hw, mode="nearest")[0, 0].numpy()
    return random_crop(image, label, rng, crop_hw)


@pytest.mark.parametrize("seed", range(8))
def test_rescale_and_crop_draws_equal_resizing_everything_then_cropping(seed):
    """The label resized inside the crop only and the image through the 4-channel kernel: the same draws
    and the same pixels, exactly, as the plain pipeline (down- and upscaling, crops larger than the image)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (37 + seed, 53, 3), dtype=np.uint8)
    label = np.kron(rng.integers(0, 4, (8, 11)), np.ones((6, 6), np.int64))[: image.shape[0], :53].astype(np.uint8)
    args = ((96, 24), (0.5, 2.0), (32, 32))
    (*size, y, x), label_crop = draw_rescale_crop(image.shape[:2], label, np.random.default_rng(seed + 100), *args)
    got = resize_image(image, tuple(size))[y : y + 32, x : x + 32], label_crop
    want = _resize_all_then_crop(image, label, np.random.default_rng(seed + 100), *args)
    assert got[0].shape == want[0].shape and np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_nearest_indices_are_torchs_own():
    for in_len in (1, 2, 3, 7, 37, 512, 683):
        for out_len in {1, 2, 5, in_len, 2 * in_len, in_len + 1, max(in_len // 2, 1), int(in_len * 1.37) + 1, 1366}:
            ramp = torch.arange(in_len, dtype=torch.float32)[None, None, :, None]
            want = torch.nn.functional.interpolate(ramp, size=(out_len, 1), mode="nearest")[0, 0, :, 0].long()
            assert np.array_equal(nearest_indices(in_len, out_len), want.numpy()), (in_len, out_len)


@pytest.mark.parametrize("source", ["array", "decoded jpeg"])
def test_resize_image_keeps_the_three_channel_kernels_result(source):
    """Through a padded copy (any array) or the decoder's own 4-byte pixels (a shard's colour JPEG)."""
    from vpd_ray.data.decode import decode_image
    from vpd_ray.data.writer import encode_jpeg

    image = np.random.default_rng(0).integers(0, 256, (40, 61, 3), dtype=np.uint8)
    if source == "decoded jpeg":
        image = decode_image(encode_jpeg(image), orient=False)
        assert image.base is not None and image.base.shape == (40, 61, 4)  # the view resize_image uses
    plain = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    for hw in ((80, 122), (17, 26), (41, 60)):
        want = torch.nn.functional.interpolate(plain.contiguous(memory_format=torch.channels_last), size=hw,
                                               mode="bilinear", align_corners=False)
        assert np.array_equal(resize_image(image, hw), want[0].permute(1, 2, 0).numpy())


def test_photometric_distortion_changes_colours_not_geometry():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8))
    outs = [photometric_distortion(image, torch.from_numpy(draw_distortion(np.random.default_rng(s)))[None])
            for s in range(8)]
    assert all(o.shape == image.shape and torch.equal(o, o.round()) and 0 <= o.min() and o.max() <= 255 for o in outs)
    assert any(not torch.equal(o, image.float()) for o in outs)


def test_train_augment_pads_small_crops_with_ignore():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (40, 60)).astype(np.uint8)
    # scale (128, 32) with ratio 1 shrinks the short side to 32 < crop 64: everything outside is padding
    out = seg_train_augment(image, label, rng, scale=(128, 32), ratio_range=(1.0, 1.0), crop_hw=(64, 64))
    img, lab = out["image"], out["label"]
    assert img.shape == (3, 64, 64) and lab.shape == (64, 64) and img.dtype == lab.dtype == torch.uint8
    assert (lab[32:] == 255).all() and out["image_hw"].tolist() == [32, 48]  # the device fills the image's 0.5
    assert set(lab[:32, :48].unique().tolist()) <= {0, 1, 2}


# --- learning on the synthetic sample shards (real model, data and protocol; see tests/learning_loop.py) ---
SEG_TINY = dict(num_classes=6, class_set="synth_seg", scale=[256, 64], crop_size=[64, 64], neck_channels=32, head_channels=16)
SEG_STEPS = 100


def best_constant_miou(model) -> float:
    """The majority-class baseline: the best mIoU of predicting one class everywhere."""
    from learning_loop import evaluate

    return max(
        evaluate(model, "seg", predict=lambda b, k=k: torch.full_like(b["label"], k))["mIoU"]
        for k in range(model.tasks["seg"].cfg.num_classes)
    )


def assert_seg_learned(model) -> float:
    from learning_loop import evaluate

    miou, baseline = evaluate(model, "seg")["mIoU"], best_constant_miou(model)
    print(f"\nseg mIoU {miou:.3f} vs majority-class baseline {baseline:.3f}")
    assert miou > 2 * baseline and miou > baseline + 0.1, f"seg mIoU {miou:.3f} vs majority baseline {baseline:.3f}"
    return miou


@pytest.mark.slow
def test_seg_learns_above_majority_class_baseline():
    from learning_loop import build, train

    from vpd_ray.tasks.seg import SegConfig, SegTask

    model = build({"seg": SegTask(SegConfig(**SEG_TINY))})
    losses = train(model, SEG_STEPS, lr=1e-3)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert_seg_learned(model)
