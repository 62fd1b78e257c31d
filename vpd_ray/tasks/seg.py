"""Semantic segmentation (ADE20K), VPD's protocol: all class embeddings as context with attention maps,
Semantic FPN, cross entropy with ignore 255, and mmseg's test protocols (single scale or multi-scale +
flip, whole image or sliding windows). The data side calls ``vpd_ray.data.augment.seg``.

``context: learned`` / ``caption`` (MetaPrompts, EVP / TADP) replace the class embeddings by learned
prompt tokens or the image's caption (T attention-map channels follow): :mod:`vpd_ray.tasks.context`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vpd_ray.contracts import Batch, Sample
from vpd_ray.metrics.seg import SegMetric
from vpd_ray.tasks import register_task
from vpd_ray.tasks.base import Task, TaskConfig, check_hw, image_of
from vpd_ray.tasks.context import ContextOptions, attach_context

TEST_MODES = ("whole", "slide")


@dataclasses.dataclass
class SegConfig(ContextOptions, TaskConfig):
    """Options under ``tasks.seg``. Defaults are the reference ADE20K run; tiny runs shrink the sizes.
    The context keys: :class:`~vpd_ray.tasks.context.ContextOptions`."""

    num_classes: int = 150  # classes = context tokens (T) under context: class; synthetic data: its K
    class_set: str = "ade20k"  # name of the class-embedding set on the backbone; names for per-class IoU
    class_embeddings: str | None = None  # safetensors from `python -m vpd_ray.embeddings`; None: seeded random
    reduce_zero_label: bool = True  # ADE20K: label 0 ("other") -> 255 (ignored), k -> k-1
    scale: list[int] = dataclasses.field(default_factory=lambda: [2048, 512])  # train jitter / test resize scale
    ratio_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])  # train scale jitter
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [512, 512])  # (h, w) train crop (padded
    # with label 255); the sliding window at test
    cat_max_ratio: float = 0.75  # a train crop may hold at most this share of one class (10 redraws)
    neck_channels: int = 256  # FPN neck width
    head_channels: int = 128  # FPN head width
    dropout: float = 0.1
    test_ratios: list[float] = dataclasses.field(default_factory=lambda: [1.0])  # 54.6 run: 0.5 .. 1.75
    test_flip: bool = False  # 54.6 run: True
    test_mode: str = "whole"  # "whole" image or "slide" windows of crop_size
    slide_stride: int = 341  # mmseg's ADE20K sliding stride for 512 windows

    def __post_init__(self) -> None:
        check_hw("tasks.seg.crop_size", self.crop_size)
        self.check_context("tasks.seg")
        if self.test_mode not in TEST_MODES:
            raise ValueError(f"tasks.seg.test_mode: {self.test_mode!r} is not one of {', '.join(TEST_MODES)}")

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> list[str]:
        """Also: ``crop_size`` was one int (a square) before it was ``[h, w]`` as in depth."""
        notices = super().upgrade(raw)
        if isinstance(raw.get("crop_size"), int):
            raw["crop_size"] = [raw["crop_size"]] * 2
            notices.append("crop_size as one int is deprecated: give [height, width]")
        return notices


def seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel cross entropy, ignored pixels excluded from the mean (mmseg ``CrossEntropyLoss``)."""
    if logits.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and label {tuple(label.shape)} differ in size")
    return F.cross_entropy(logits.float(), label.long(), ignore_index=ignore_index)


def slide_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: tuple[int, int], stride: int
) -> torch.Tensor:
    """mmseg ``slide_inference``: ``window`` (h, w) crops every ``stride`` (last one flush with the edge), averaged."""
    _, _, h, w = images.shape
    wh, ww = window
    rows = max(h - wh + stride - 1, 0) // stride + 1
    cols = max(w - ww + stride - 1, 0) // stride + 1
    total, count = None, images.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + wh, h), min(c * stride + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            part = forward(images[..., y1:y2, x1:x2])
            total = images.new_zeros(images.shape[0], part.shape[1], h, w) if total is None else total
            total[..., y1:y2, x1:x2] += part
            count[..., y1:y2, x1:x2] += 1
    return total / count


def multiscale_probs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scale: tuple[int, int],
    ratios: list[float],
    flip: bool,
    slide: tuple[tuple[int, int], int] | None = None,
) -> torch.Tensor:
    """Softmax scores ``[B, K, H, W]`` averaged over keep-ratio resizes (``scale * ratio``) and flips.

    As mmseg's ``MultiScaleFlipAug`` + ``aug_test``: each view's logits are resized back to the input
    size before the softmax; single scale without flip is ratio ``[1.0]``, ``flip=False``.
    """
    from vpd_ray.data.augment.seg import rescale_size

    h, w = images.shape[-2:]
    run = forward if slide is None else (lambda x: slide_logits(forward, x, *slide))
    total = 0.0
    views = 0
    for ratio in ratios:
        size = rescale_size((h, w), (int(scale[0] * ratio), int(scale[1] * ratio)))
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = run(scaled.flip(-1) if flipped else scaled)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            total = total + logits.softmax(dim=1)
            views += 1
    return total / views


@register_task
class SegTask(Task):
    name = "seg"
    config_class = SegConfig
    primary_metric = "mIoU"
    metric_mode = "max"
    fields = ("jpg", "png", "label.png", "json")
    # The paper's table columns for this task: (metric key, column label), for `python -m vpd_ray.evaluate`.
    paper_row = (("mIoU", "mIoU"), ("aAcc", "aAcc"))
    output_kind = "labels"
    decodes_jpeg_on_device = True
    cfg: SegConfig

    def __init__(self, cfg: SegConfig):
        super().__init__(cfg)
        self.text_context = attach_context(self, cfg)  # None: every class embedding, VPD's path below

    # --- model side -------------------------------------------------------------------------
    @property
    def uses_attention_maps(self) -> bool:
        return True

    def context_tokens(self) -> int:
        return self.cfg.num_classes if self.text_context is None else self.text_context.tokens(self.cfg.num_classes)

    def build_head(self, backbone: Any) -> torch.nn.Module:
        """Semantic FPN on ``feature_info(T)``; registers ``backbone.class_embeddings[class_set]`` (the
        prompt tokens or the text model instead, under the other contexts)."""
        from vpd_ray.model.backbone import ClassEmbeddings
        from vpd_ray.model.heads.seg import SemanticFPNHead
        from vpd_ray.model.text import class_vectors

        name = self.cfg.class_set
        if self.text_context is not None:
            self.text_context.build(backbone)
        elif name not in backbone.class_embeddings:
            backbone.class_embeddings[name] = ClassEmbeddings(
                class_vectors(self.cfg.num_classes, self.cfg.class_embeddings, backbone.text_dim))
        elif backbone.class_embeddings[name].num_classes != self.cfg.num_classes:
            raise ValueError(
                f"class set {name!r} is already on the backbone with {backbone.class_embeddings[name].num_classes} "
                f"classes, but tasks.seg.num_classes is {self.cfg.num_classes}"
            )
        return SemanticFPNHead(
            backbone.feature_info(self.context_tokens()),
            self.cfg.num_classes,
            neck_channels=self.cfg.neck_channels,
            channels=self.cfg.head_channels,
            dropout=self.cfg.dropout,
        )

    def context(self, backbone: Any, batch: Batch) -> torch.Tensor:
        """Every class embedding for every image: ``[B, K, D]`` (the mean row is left out); under
        ``context: learned`` / ``caption``, the prompt tokens or the caption's CLIP encoding ``[B, T, D]``."""
        if self.text_context is not None:
            return self.text_context.context(backbone, batch)
        vectors = backbone.class_embeddings[self.cfg.class_set].weight[:-1]  # [K, D]
        return vectors[None].expand(batch["image"].shape[0], -1, -1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return seg_loss(outputs, batch["label"])

    def predict(self, forward: Callable[[torch.Tensor, Batch], Any], batch: Batch) -> torch.Tensor:
        """Class ids ``[B, H, W]`` at the input resolution, by ``test_ratios`` / ``test_flip`` / ``test_mode``."""
        cfg = self.cfg
        slide = (tuple(cfg.crop_size), cfg.slide_stride) if cfg.test_mode == "slide" else None
        probs = multiscale_probs(
            lambda x: forward(x, {**batch, "image": x}), batch["image"], tuple(cfg.scale), list(cfg.test_ratios),
            cfg.test_flip, slide,
        )  # fmt: skip
        return probs.argmax(dim=1)

    def metric(self) -> SegMetric:
        return SegMetric(self.cfg.num_classes, class_names=self._class_names())

    def _class_names(self) -> list[str] | None:
        from vpd_ray.model.text import CLASS_SETS

        names = CLASS_SETS.get(self.cfg.class_set, ())
        return list(names) if len(names) == self.cfg.num_classes else None

    # --- pictures -------------------------------------------------------------------------------
    def panels(self, image: Any, prediction: Any, truth: Any = None, sentence: str | None = None,
               fixed_scale: bool = False) -> list[Any]:
        """image | ground truth | prediction, class colours (the ADE20K palette) over the image, each
        with a legend of the classes it shows."""
        from vpd_ray import visualize as vz

        names = self._class_names() or ()
        panels = [vz.image_panel(image)]
        if truth is not None:
            panels.append(vz.seg_panel(image, truth, names, "ground truth"))
        return panels + [vz.seg_panel(image, prediction, names, "prediction")]

    def example(self, batch: Batch, prediction: torch.Tensor, index: int) -> list[Any]:
        """``prediction`` and ``batch["label"]``: ``[B,H,W]`` class ids (255 ignored)."""
        as_ids = lambda t: t[index].cpu().numpy().astype(np.uint8)  # noqa: E731  (ids < 256)
        return self.panels(image_of(batch, index), as_ids(prediction), as_ids(batch["label"]))

    # --- data side --------------------------------------------------------------------------
    def _label(self, sample: Sample) -> np.ndarray:
        from vpd_ray.data.augment.seg import reduce_zero_label

        label = sample["label"]
        if label.shape != sample["image"].shape[:2]:
            raise ValueError(f"sample {sample.get('__key__')}: label {label.shape} and image {sample['image'].shape[:2]} differ")
        return reduce_zero_label(label) if self.cfg.reduce_zero_label else label

    def train_transform(self, sample: Sample, rng: Any) -> dict[str, Any]:
        from vpd_ray.data.augment.seg import seg_train_augment

        out = seg_train_augment(
            sample["image"], self._label(sample), rng, self.cfg.scale, self.cfg.ratio_range, tuple(self.cfg.crop_size),
            self.cfg.cat_max_ratio,
        )  # fmt: skip
        return out if self.text_context is None else {**out, **self.text_context.sample_inputs(sample)}

    def augment_on_device(self, batch: Batch) -> Batch:
        """mmseg's photometric distortion with the transform's parameters, then the image padding (0.5);
        uint8 image -> float [0,1] (JPEGs the loader left encoded are decoded, resized and cropped first).
        A batch without ``photometric`` (built by hand, already float) passes as it is."""
        from vpd_ray.data.augment.seg import fill_padding, finish_images, photometric_distortion

        if "photometric" not in batch:
            return batch
        # decoded, resized and cropped here under data.jpeg_decode: device
        images = finish_images(batch["image"], batch["photometric"].device, tuple(self.cfg.crop_size))
        image = photometric_distortion(images, batch["photometric"]) / 255
        return {**batch, "image": fill_padding(image, batch["image_hw"])}

    def inference_batch(self, pixels: torch.Tensor, inputs: list[dict[str, Any]], protocol: bool) -> Batch:
        if self.text_context is not None:  # the prompts (nothing per image) or each image's caption
            return {"image": pixels, **self.text_context.inference_inputs(inputs, pixels.device)}
        return {"image": pixels}  # the context is every class embedding, whatever the image

    def eval_transform(self, sample: Sample) -> dict[str, Any]:
        """The image as stored (``predict`` resizes it) and the full-resolution label, as mmseg evaluates.

        ADE20K images differ in size, so evaluate with ``eval_batch_size: 1`` (the default).
        """
        image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float() / 255.0
        out = {"image": image, "label": torch.from_numpy(self._label(sample)).long()}
        return out if self.text_context is None else {**out, **self.text_context.sample_inputs(sample)}

    # --- report ---------------------------------------------------------------------------------
    score_label = "per-image mIoU (fraction, 0 to 1)"

    def scores(self, prediction: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, None]:
        """Each image's mIoU ``[B, 1]``: the split's formula (``intersect_and_union``, nan-mean over
        the classes in prediction or label) on that image alone; NaN where every pixel is ignored."""
        from vpd_ray.metrics.seg import intersect_and_union

        values = []
        for pred, label in zip(prediction.detach().cpu(), batch["label"].detach().cpu()):
            intersect, union = intersect_and_union(pred, label, self.cfg.num_classes)[:2]
            values.append(torch.nanmean(intersect / union))
        return torch.stack(values).double()[:, None], None
