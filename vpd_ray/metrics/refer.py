"""Referring segmentation metrics: overall IoU, mean IoU and precision at IoU 0.5..0.9.

The reference evaluation (LAVT / VPD ``refer``) scores every sentence of every ref on its own:
oIoU = sum of intersections / sum of unions over all sentences, mIoU = mean of per-sentence IoU
(an empty union counts as IoU 0), P@t = share of sentences with IoU >= t. The state is a float64
vector of sums, so the states of several workers add up to the single-process state.
"""

from __future__ import annotations

import torch

from vpd_ray.contracts import Batch, Metric

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask (intersection, union, IoU) of binary masks ``[N, H, W]``; IoU is 0 where the union is empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    return inter, union, iou


class ReferMetric(Metric):
    """``update(pred, batch)``: ``pred`` is ``[B, S, H, W]`` (one 0/1 mask per sentence slot) or
    ``[B, H, W]``; ``batch["mask"]`` is ``[B, H, W]``; ``batch["sentence_valid"]`` ``[B, S]`` marks the
    real sentences among padded slots (all valid when absent).

    State: ``[sum_I, sum_U, sum_IoU, n, hits@0.5, ..., hits@0.9]``.
    """

    def __init__(self):
        self.sums = torch.zeros(4 + len(PRECISION_THRESHOLDS), dtype=torch.float64)

    def update(self, pred: torch.Tensor, batch: Batch) -> None:
        pred = pred.cpu()
        if pred.dim() == 3:
            pred = pred[:, None]
        target = batch["mask"].cpu()[:, None].expand_as(pred)  # [B, S, H, W]
        valid = batch.get("sentence_valid")
        valid = torch.ones(pred.shape[:2], dtype=torch.bool) if valid is None else valid.cpu().bool()
        inter, union, iou = mask_iou(pred[valid], target[valid])
        hits = [(iou >= t).sum() for t in PRECISION_THRESHOLDS]
        self.sums += torch.stack([inter.sum(), union.sum(), iou.sum(), torch.tensor(float(len(iou)))] + hits).double()

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.sums = state.to(torch.float64).clone()

    def compute(self) -> dict[str, float]:
        inter, union, iou_sum, n = self.sums[:4].tolist()
        out = {"oIoU": inter / union if union else 0.0, "mIoU": iou_sum / n if n else 0.0}
        for t, hits in zip(PRECISION_THRESHOLDS, self.sums[4:].tolist()):
            out[f"P@{t:.1f}"] = hits / n if n else 0.0
        return out
