"""Referring segmentation: top-down decoder, oIoU/mIoU/P@k accumulator, resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpd_ray.data.augment.refer import pick_sentence, resize_square
from vpd_ray.metrics.refer import ReferMetric, mask_iou
from vpd_ray.model.heads.refer import ReferDecoder

SD_INFO_T40 = [{"num_chs": 320, "reduction": 8}, {"num_chs": 680, "reduction": 16},
               {"num_chs": 1320, "reduction": 32}, {"num_chs": 1280, "reduction": 64}]  # fmt: skip
TINY_INFO = [{"num_chs": 8, "reduction": 8}, {"num_chs": 16 + 6, "reduction": 16},
             {"num_chs": 32 + 6, "reduction": 32}, {"num_chs": 32, "reduction": 64}]  # fmt: skip


def test_decoder_hidden_is_half_the_coarsest_channels_like_the_reference():
    dec = ReferDecoder(SD_INFO_T40)
    assert dec.fuse4[0].in_channels == 1280 + 1320 and dec.fuse4[0].out_channels == 640
    assert dec.fuse3[0].in_channels == 640 + 680 and dec.fuse2[0].in_channels == 640 + 320
    assert dec.classifier.out_channels == 2


def test_decoder_logits_cover_the_unpadded_image_and_train():
    dec = ReferDecoder(TINY_INFO, hidden=8)
    feats = [torch.randn(2, i["num_chs"], 128 // i["reduction"], 128 // i["reduction"]) for i in TINY_INFO]
    logits = dec(feats, (120, 128))
    assert logits.shape == (2, 2, 120, 128)
    logits.sum().backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_decoder_needs_four_levels():
    with pytest.raises(ValueError, match="4 feature levels"):
        ReferDecoder(TINY_INFO[:3])


def test_mask_iou_hand_computed_and_empty_union_is_zero():
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    target = torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]]])
    inter, union, iou = mask_iou(pred, target)
    assert inter.tolist() == [1, 0] and union.tolist() == [3, 0] and iou.tolist() == [pytest.approx(1 / 3), 0.0]


def test_refer_metric_scores_every_valid_sentence():
    metric = ReferMetric()
    target = torch.tensor([[[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]])  # [B=1, H=1, W=10], 4 object pixels
    pred = torch.stack([
        torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]),  # IoU 1
        torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]),  # IoU 3/4
        torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]),  # IoU 2/4
        torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]),  # padded slot: ignored
    ])[None]  # [1, S=4, 1, 10]
    metric.update(pred, {"mask": target, "sentence_valid": torch.tensor([[True, True, True, False]])})
    out = metric.compute()
    assert out["oIoU"] == pytest.approx((4 + 3 + 2) / (4 + 4 + 4))
    assert out["mIoU"] == pytest.approx((1 + 0.75 + 0.5) / 3)
    assert out["P@0.5"] == pytest.approx(1.0)  # >= 0.5 counts, as in the reference
    assert out["P@0.7"] == pytest.approx(2 / 3)
    assert out["P@0.8"] == pytest.approx(1 / 3)


def test_refer_metric_distributed_states_sum_to_single_process():
    gen = torch.Generator().manual_seed(0)
    single, ranks = ReferMetric(), [ReferMetric(), ReferMetric()]
    for i in range(6):
        batch = {"mask": torch.randint(0, 2, (2, 6, 6), generator=gen)}
        pred = torch.randint(0, 2, (2, 6, 6), generator=gen)
        single.update(pred, batch)
        ranks[i % 2].update(pred, batch)
    merged = ReferMetric()
    merged.load_state(ranks[0].state() + ranks[1].state())
    assert merged.compute() == pytest.approx(single.compute())


def test_resize_square_keeps_mask_binary():
    image = np.zeros((30, 50, 3), dtype=np.uint8)
    mask = np.zeros((30, 50), dtype=np.uint8)
    mask[10:20, 10:30] = 1
    img, msk = resize_square(image, mask, 64)
    assert img.shape == (3, 64, 64) and msk.shape == (64, 64)
    assert set(msk.unique().tolist()) == {0, 1}


def test_pick_sentence_draws_each_sentence():
    rng = np.random.default_rng(0)
    assert {pick_sentence(["a", "b", "c"], rng) for _ in range(50)} == {"a", "b", "c"}
    with pytest.raises(ValueError):
        pick_sentence([], rng)


# --- learning on the synthetic sample shards (real model, data and protocol; see tests/learning_loop.py) ---
# The tiny random UNet has nothing pretrained to protect: it trains at the full learning rate.
REFER_TINY = dict(text_encoder="tiny", max_tokens=8, image_size=128, decoder_hidden=32,
                  class_weights=[0.5, 1.5])  # targets cover ~5% of a sample image  # fmt: skip


@torch.no_grad()
def phrase_swap_ious(model, max_pairs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per validation sample: IoU of the mask predicted for its first sentence with its own target and
    with the target of its pair (the same image, another object). ``[N]`` each.

    The sample shards hold pairs ``2k, 2k+1`` of one scene; a model that ignores the text predicts the
    same mask for both sentences, so on average it scores the same against both targets.
    """
    from learning_loop import one_thread, sample_urls

    from vpd_ray.data.pipeline import build_stream

    task = model.tasks["refer"]
    model.eval()
    stream = build_stream(sample_urls("refer", "val"), task.eval_transform, train=False, batch_size=2,
                          fields=task.fields, num_workers=0)  # fmt: skip
    own, swapped = [], []
    with one_thread():
        for i, batch in enumerate(stream):
            if i >= max_pairs:
                break
            assert torch.equal(batch["image"][0], batch["image"][1]), "sample shards are not in image pairs"
            logits = model.forward_images("refer", batch["image"], {"input_ids": batch["input_ids"][:, 0]})
            pred = logits.argmax(dim=1)  # [2, H, W]
            own += mask_iou(pred, batch["mask"])[2].tolist()
            swapped += mask_iou(pred, batch["mask"].flip(0))[2].tolist()
    return np.array(own), np.array(swapped)


@pytest.mark.slow
def test_refer_learns_and_two_phrases_on_one_image_select_two_objects():
    from learning_loop import build, evaluate, train

    from vpd_ray.tasks.refer import ReferConfig, ReferTask

    model = build({"refer": ReferTask(ReferConfig(**REFER_TINY))})
    losses = train(model, 900, lr=2e-3, unet_lr_mult=1.0, grad_clip=1.0)
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])

    oiou = evaluate(model, "refer")["oIoU"]

    def constant(value: int):
        return lambda b: torch.full((*b["input_ids"].shape[:2], *b["mask"].shape[-2:]), value)  # [B, S, H, W]

    empty, whole = (evaluate(model, "refer", predict=constant(v))["oIoU"] for v in (0, 1))
    own, swapped = phrase_swap_ious(model)
    pairs = (own > swapped).reshape(-1, 2).all(axis=1)  # both phrases of the image pick their own object
    print(f"\nrefer oIoU {oiou:.3f} vs empty-mask {empty:.3f} and whole-image {whole:.3f} baselines; "
          f"IoU with the phrase's object {own.mean():.3f} vs the other object {swapped.mean():.3f}; "
          f"{pairs.sum()}/{len(pairs)} images where each of two phrases selects its own object")  # fmt: skip
    assert empty == 0.0
    assert oiou > 3 * whole, f"refer oIoU {oiou:.3f} vs whole-image baseline {whole:.3f}"
    assert own.mean() > 2 * swapped.mean(), (own.mean(), swapped.mean())
    assert pairs.mean() >= 0.4, f"only {pairs.sum()}/{len(pairs)} images where two phrases select two objects"
