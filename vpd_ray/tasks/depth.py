"""Monocular depth (NYUv2), VPD's protocol: one scene-class token of context, SiLog loss, and the
test-time sliding windows with flips. The data side calls ``vpd_ray.data.augment.depth``.

``context: learned`` / ``caption`` (MetaPrompts, EVP / TADP) replace the class token by learned prompt
tokens or the image's caption: :mod:`vpd_ray.tasks.context`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from vpd_ray.contracts import Batch, Sample
from vpd_ray.metrics.depth import DepthMetric
from vpd_ray.tasks import register_task
from vpd_ray.tasks.base import Task, TaskConfig, check_hw, image_of
from vpd_ray.tasks.context import ContextOptions, attach_context


@dataclasses.dataclass
class DepthConfig(ContextOptions, TaskConfig):
    """Options under ``tasks.depth`` (the context keys: :class:`~vpd_ray.tasks.context.ContextOptions`)."""

    renamed: ClassVar[dict[str, str]] = {**TaskConfig.renamed, "flip_test": "test_flip"}

    crop_size: list[int] = dataclasses.field(default_factory=lambda: [480, 480])  # (h, w) train crop = test window
    max_depth: float = 10.0  # output range (sigmoid * max_depth) and upper bound of valid gt in evaluation
    min_depth: float = 1e-3  # lower bound of valid gt in evaluation
    eigen_crop: bool = True  # evaluate inside the Eigen crop (480x640 images only)
    class_set: str = "nyu"  # built-in class names ("nyu", "ade20k") the class ids index
    class_embeddings: str | None = None  # safetensors from `python -m vpd_ray.embeddings`; None: seeded random
    head_dim: int = 192  # decoder width; neck width is 8x this (VPD: 192 -> 1536)
    test_flip: bool = True  # test protocol: average each window with its horizontally flipped pass

    def __post_init__(self) -> None:
        check_hw("tasks.depth.crop_size", self.crop_size)
        self.check_context("tasks.depth")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"tasks.depth needs 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, variance_focus: float = 0.5) -> torch.Tensor:
    """``sqrt(mean(d^2) - 0.5 * mean(d)^2)``, ``d = log gt - log pred``, over all pixels with gt > 0.

    Masked means rather than boolean indexing, so nothing waits for the device (indexing by a mask
    needs its count on the host). A batch without valid depth gives NaN (0 / 0), which the trainer's
    finite-loss check skips or stops on, by ``train.nan_policy``.
    """
    valid = gt > 0
    ones = torch.ones((), dtype=torch.float32, device=gt.device)
    d = torch.log(torch.where(valid, gt.float(), ones)) - torch.log(torch.where(valid, pred.float(), ones))  # fp32
    count = valid.sum()
    mean, mean_sq = d.sum() / count, (d * d).sum() / count  # d is 0 where gt is not valid
    return torch.sqrt(mean_sq - variance_focus * mean**2)


def window_offsets(image_w: int, window_w: int) -> list[int]:
    """Left edges of the fewest equally spaced ``window_w`` windows covering ``image_w`` (640/480: 0, 160)."""
    if window_w > image_w:
        raise ValueError(f"test window width {window_w} exceeds image width {image_w}")
    count = -(-image_w // window_w)
    if count == 1:
        return [0]
    step, rest = divmod(image_w - window_w, count - 1)
    if rest:
        raise ValueError(
            f"{count} windows of width {window_w} cannot tile width {image_w} evenly "
            f"({image_w - window_w} is not divisible by {count - 1}); pick another crop_size or image size"
        )
    return [i * step for i in range(count)]


def sliding_window_predict(
    forward: Callable[[torch.Tensor, Batch], torch.Tensor], batch: Batch, window_hw: tuple[int, int], flip: bool
) -> torch.Tensor:
    """The NYUv2 test protocol: windows across the width (each + its flip), averaged where they overlap.

    All windows and flips of the batch go through ``forward`` as one stacked batch; per-sample
    tensors of ``batch`` (e.g. ``class_id``) are repeated to match.
    """
    images = batch["image"]  # [B, 3, H, W]
    b, _, h, w = images.shape
    if h != window_hw[0]:
        raise ValueError(f"image height {h} differs from the test window height {window_hw[0]} (crop_size)")
    offsets = window_offsets(w, window_hw[1])
    views = [images[..., x : x + window_hw[1]] for x in offsets]
    if flip:
        views += [v.flip(-1) for v in views]
    pred = forward(torch.cat(views), _repeat_batch(batch, b, len(views))).float()  # [n*B, 1, h, window_w]
    parts = pred.split(b)
    if flip:
        half = len(offsets)
        parts = [(p + q.flip(-1)) / 2 for p, q in zip(parts[:half], parts[half:])]
    total = pred.new_zeros(b, pred.shape[1], h, w)
    count = pred.new_zeros(1, 1, 1, w)
    for x, part in zip(offsets, parts):
        total[..., x : x + window_hw[1]] += part
        count[..., x : x + window_hw[1]] += 1
    return total / count


def _repeat_batch(batch: Batch, size: int, times: int) -> Batch:
    return {
        k: torch.cat([v] * times) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size else v
        for k, v in batch.items()
    }


@register_task
class DepthTask(Task):
    name = "depth"
    config_class = DepthConfig
    primary_metric = "rmse"
    metric_mode = "min"
    fields = ("jpg", "png", "depth.png", "json")
    paper_row = (("rmse", "RMSE"), ("d1", "d1"), ("d2", "d2"), ("d3", "d3"), ("abs_rel", "REL"), ("log10", "log10"))
    output_kind = "depth"
    decodes_jpeg_on_device = True
    cfg: DepthConfig

    def __init__(self, cfg: DepthConfig):
        super().__init__(cfg)
        self.text_context = attach_context(self, cfg)  # None: the class token, VPD's path below

    # --- model side -------------------------------------------------------------------------
    def context_tokens(self) -> int:
        return 1 if self.text_context is None else self.text_context.tokens(1)

    def build_head(self, backbone: Any) -> torch.nn.Module:
        """The depth head; registers ``backbone.class_embeddings[class_set]`` if not there yet (the
        prompt tokens or the text model instead, under the other contexts)."""
        from vpd_ray.model.backbone import ClassEmbeddings
        from vpd_ray.model.heads.depth import DepthHead

        if self.text_context is not None:
            self.text_context.build(backbone)
        elif self.cfg.class_set not in backbone.class_embeddings:
            from vpd_ray.model.text import class_names, class_vectors

            count = len(class_names(self.cfg.class_set))
            vectors = class_vectors(count, self.cfg.class_embeddings, backbone.text_dim)
            backbone.class_embeddings[self.cfg.class_set] = ClassEmbeddings(vectors)
        return DepthHead(backbone.feature_info(), head_dim=self.cfg.head_dim, max_depth=self.cfg.max_depth)

    def context(self, backbone: Any, batch: Batch) -> torch.Tensor:
        """The scene's class embedding as one token ``[B, 1, D]`` (class id -1: mean of all classes);
        under ``context: learned`` / ``caption``, the prompt tokens or the caption's CLIP encoding."""
        if self.text_context is not None:
            return self.text_context.context(backbone, batch)
        return backbone.class_embeddings[self.cfg.class_set](batch["class_id"])[:, None]

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return silog_loss(outputs, batch["depth"])

    def predict(self, forward: Callable[[torch.Tensor, Batch], Any], batch: Batch) -> torch.Tensor:
        return sliding_window_predict(forward, batch, tuple(self.cfg.crop_size), self.cfg.test_flip)

    def metric(self) -> DepthMetric:
        return DepthMetric(self.cfg.min_depth, self.cfg.max_depth, self.cfg.eigen_crop)

    # --- data side --------------------------------------------------------------------------
    def train_transform(self, sample: Sample, rng: Any) -> dict[str, Any]:
        from vpd_ray.data.augment.depth import train_augment

        image, depth, params = train_augment(sample["image"], sample["depth"], rng, tuple(self.cfg.crop_size))
        out = {"image": image, "depth": depth, "class_id": self._class_id(sample), "photometric": params}
        return out if self.text_context is None else {**out, **self.text_context.sample_inputs(sample)}

    def augment_on_device(self, batch: Batch) -> Batch:
        """Brightness/contrast, gamma and HSV with the transform's parameters; uint8 image -> float [0,1]
        (JPEGs the loader left encoded are decoded and cropped first).
        A batch without ``photometric`` (built by hand, already float) passes as it is."""
        from vpd_ray.data.augment.depth import finish_images, photometric

        if "photometric" not in batch:
            return batch
        images = finish_images(batch["image"], batch["depth"])  # decoded here under data.jpeg_decode: device
        return {**batch, "image": photometric(images, batch["photometric"]) / 255}

    def eval_transform(self, sample: Sample) -> dict[str, Any]:
        from vpd_ray.data.augment.depth import eval_transform

        image, depth = eval_transform(sample["image"], sample["depth"])
        out = {"image": image, "depth": depth, "class_id": self._class_id(sample)}
        return out if self.text_context is None else {**out, **self.text_context.sample_inputs(sample)}

    def inference_batch(self, pixels: torch.Tensor, inputs: list[dict[str, Any]], protocol: bool) -> Batch:
        """Each image's scene class where its meta names one (NYU shards, as evaluation does), else -1:
        the mean class embedding, VPD.md's default for photos of unknown scenes."""
        ids = torch.stack([self._class_id(item) for item in inputs]).to(pixels.device)
        if self.text_context is not None:
            return {"image": pixels, "class_id": ids, **self.text_context.inference_inputs(inputs, pixels.device)}
        return {"image": pixels, "class_id": ids}

    # --- pictures -------------------------------------------------------------------------------
    def panels(self, image: Any, prediction: Any, truth: Any = None, sentence: str | None = None,
               fixed_scale: bool = False) -> list[Any]:
        """image | ground truth | prediction | error, ground truth and prediction on one scale: 0 to
        ``max_depth`` m when ``fixed_scale``, else the ground truth's valid range (the prediction's
        without one), so the two read the same colour for the same depth."""
        from vpd_ray import visualize as vz

        reference = prediction if truth is None else truth
        lo, hi = (0.0, self.cfg.max_depth) if fixed_scale else vz.value_range(reference, reference > 0)
        panels = [vz.image_panel(image)]
        if truth is not None:
            panels.append(vz.depth_panel(truth, "ground truth", lo, hi))
        panels.append(vz.depth_panel(prediction, "prediction", lo, hi))
        if truth is not None:
            panels.append(vz.error_panel(prediction, truth))
        return panels

    def example(self, batch: Batch, prediction: torch.Tensor, index: int) -> list[Any]:
        """``prediction`` and ``batch["depth"]``: ``[B,1,H,W]`` metres."""
        return self.panels(image_of(batch, index), prediction[index, 0].float().cpu().numpy(),
                           batch["depth"][index, 0].float().cpu().numpy())

    def _class_id(self, sample: Sample) -> torch.Tensor:
        """``meta["class_id"]``, else the index of ``meta["scene"]`` in the class set, else -1 (unknown)."""
        from vpd_ray.model.text import class_names

        meta = sample.get("meta") or {}
        names = class_names(self.cfg.class_set)
        if "class_id" in meta:  # checked here, on the host, so the model's lookup needs no device sync
            class_id = int(meta["class_id"])
            if not -1 <= class_id < len(names):
                raise ValueError(f"sample {sample.get('__key__')!r}: class_id {class_id} outside -1..{len(names) - 1} "
                                 f"(tasks.depth.class_set={self.cfg.class_set})")
            return torch.tensor(class_id, dtype=torch.long)
        scene = meta.get("scene")
        return torch.tensor(names.index(scene) if scene in names else -1, dtype=torch.long)

    # --- report ---------------------------------------------------------------------------------
    score_label = "per-image RMSE (m)"
    score_groups = "scene"

    def scores(self, prediction: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        """Each image's RMSE as the metric computes it (``[B, 1]`` metres), grouped by the scene its
        ``class_id`` names ("unknown" for -1): the protocol averages per image, so a scene's mean is
        that scene's RMSE."""
        from vpd_ray.metrics.depth import depth_metrics
        from vpd_ray.model.text import class_names

        rmse = [depth_metrics(p, g, self.cfg.min_depth, self.cfg.max_depth, self.cfg.eigen_crop)["rmse"]
                for p, g in zip(prediction.detach().cpu(), batch["depth"].detach().cpu())]
        names = class_names(self.cfg.class_set)
        scenes = [names[k] if 0 <= k < len(names) else "unknown" for k in batch["class_id"].tolist()]
        return torch.tensor(rmse, dtype=torch.float64)[:, None], scenes
