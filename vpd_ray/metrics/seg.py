"""Semantic segmentation metric: per-class intersection / union summed over a whole split.

mmseg's protocol (and the paper's 53.7 / 54.6): areas are summed over every image (and every
worker) first and divided once at the end, so mIoU is not a mean of per-image IoUs. The state is
``[intersect(K), union(K), pred_area(K), label_area(K)]`` as float64 sums, so summing the states of
several workers equals accumulating everything in one process.
"""

from __future__ import annotations

import torch

from vpd_ray.contracts import Batch, Metric


def intersect_and_union(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Areas ``[4, K]`` (intersect, union, pred, label) of integer maps ``pred``/``label`` (same shape).

    Pixels whose label is ``ignore_index`` count nowhere, as in mmseg.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}, got max {int(label.max())}")
    hits = pred[pred == label]
    areas = [torch.bincount(x, minlength=num_classes)[:num_classes] for x in (hits, pred, label)]
    intersect, area_pred, area_label = (a.double() for a in areas)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


class SegMetric(Metric):
    """mIoU / aAcc / per-class IoU over a split. ``update(pred [B,H,W] class ids, batch["label"] [B,H,W])``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, batch: Batch) -> None:
        self.areas += intersect_and_union(pred.cpu(), batch["label"].cpu(), self.num_classes, self.ignore_index)

    def state(self) -> torch.Tensor:
        return self.areas.flatten()

    def load_state(self, state: torch.Tensor) -> None:
        self.areas = state.to(torch.float64).reshape(4, self.num_classes).clone()

    def compute(self) -> dict[str, float]:
        """``mIoU`` (nan-mean over classes present in prediction or label), ``aAcc``, ``mAcc``, ``IoU.<class>``."""
        intersect, union, _, area_label = self.areas
        iou = intersect / union  # nan where a class never occurs: left out of the mean, as in mmseg
        acc = intersect / area_label
        out = {
            "mIoU": float(torch.nanmean(iou)),
            "aAcc": float(intersect.sum() / area_label.sum()),
            "mAcc": float(torch.nanmean(acc)),
        }
        names = self.class_names or [str(k) for k in range(self.num_classes)]
        out.update({f"IoU.{name}": float(v) for name, v in zip(names, iou)})
        return out
