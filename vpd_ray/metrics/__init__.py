"""Evaluation metrics, one module per task; every accumulator's ``state()`` is a 1-d tensor of sums.

Import from here: ``from vpd_ray.metrics import depth_metrics, DepthMetric``.
"""

from vpd_ray.metrics.depth import DEPTH_METRICS, DepthMetric, depth_metrics
from vpd_ray.metrics.refer import ReferMetric
from vpd_ray.metrics.seg import SegMetric

__all__ = ["DEPTH_METRICS", "DepthMetric", "depth_metrics", "ReferMetric", "SegMetric"]
