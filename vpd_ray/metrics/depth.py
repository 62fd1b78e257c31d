"""Depth metrics as the reference NYUv2 evaluation computes them: per image, then averaged over images."""

from __future__ import annotations

import torch

from vpd_ray.contracts import Batch, Metric

DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
EIGEN_SHAPE = (480, 640)
EIGEN_ROWS, EIGEN_COLS = slice(45, 471), slice(41, 601)  # rows 45..470, cols 41..600 of 480x640


def depth_metrics(
    pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True
) -> dict[str, float]:
    """Metrics of one image (``pred``, ``gt``: ``[H, W]`` metres; 480x640 when ``eigen_crop``).

    Valid pixels: ``min_depth < gt < max_depth`` (inside the Eigen crop). As the reference, an inf
    prediction counts as ``max_depth`` and a NaN one as ``min_depth``.
    """
    pred, gt = pred.squeeze().double(), gt.squeeze().double()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {list(pred.shape)} and ground truth {list(gt.shape)} differ in shape")
    pred = torch.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=max_depth)
    valid = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        if tuple(gt.shape) != EIGEN_SHAPE:
            raise ValueError(f"the Eigen crop is defined on 480x640 images, got {list(gt.shape)}; set eigen_crop=False")
        crop = torch.zeros_like(valid)
        crop[EIGEN_ROWS, EIGEN_COLS] = True
        valid &= crop
    p, g = pred[valid], gt[valid]
    thresh = torch.maximum(g / p, p / g)
    diff, diff_log = p - g, torch.log(p) - torch.log(g)
    values = {
        "d1": (thresh < 1.25).double().mean(),
        "d2": (thresh < 1.25**2).double().mean(),
        "d3": (thresh < 1.25**3).double().mean(),
        "abs_rel": (diff.abs() / g).mean(),
        "sq_rel": (diff**2 / g).mean(),
        "rmse": (diff**2).mean().sqrt(),
        "rmse_log": (diff_log**2).mean().sqrt(),
        "log10": (torch.log10(p) - torch.log10(g)).abs().mean(),
        "silog": ((diff_log**2).mean() - 0.5 * diff_log.mean() ** 2).sqrt(),
    }
    return {k: float(v) for k, v in values.items()}


class DepthMetric(Metric):
    """Sums of per-image :func:`depth_metrics` and the image count: ``state`` = ``[sum d1, ..., sum silog, n]``."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True):
        self.min_depth, self.max_depth, self.eigen_crop = min_depth, max_depth, eigen_crop
        self._state = torch.zeros(len(DEPTH_METRICS) + 1, dtype=torch.float64)

    def update(self, pred: torch.Tensor, batch: Batch) -> None:
        """``pred`` and ``batch["depth"]``: ``[B, 1, H, W]`` metres."""
        for p, g in zip(pred.detach().cpu(), batch["depth"].detach().cpu()):
            m = depth_metrics(p, g, self.min_depth, self.max_depth, self.eigen_crop)
            self._state += torch.tensor([*(m[k] for k in DEPTH_METRICS), 1.0], dtype=torch.float64)

    def state(self) -> torch.Tensor:
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self._state = state.detach().to("cpu", torch.float64).clone()

    def compute(self) -> dict[str, float]:
        count = float(self._state[-1])
        if count == 0:
            raise ValueError("DepthMetric.compute before any update: no images were evaluated")
        return {k: float(v) / count for k, v in zip(DEPTH_METRICS, self._state[:-1])}
