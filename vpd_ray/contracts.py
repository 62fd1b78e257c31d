"""The data contracts every layer shares: a decoded sample, a collated batch, a metric accumulator.

They sit on the lowest floor so that ``data/``, ``metrics/``, ``tasks/``, ``engine/`` and
``inference/`` can all name them without importing each other (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import torch

# A decoded shard sample: "__key__", "__url__", "image" (uint8 HxWx3 numpy), "meta" (dict from the
# json field) and the task's label fields ("depth": float32 HxW metres, "label"/"mask": uint8 HxW).
Sample = dict[str, Any]
# A collated batch: "image" float32 [B,3,H,W] in [0,1] plus the task's tensors. Train batches of depth
# and seg cross the host-to-device copy as uint8 with their photometric parameters, and become that
# in ``Task.augment_on_device``.
Batch = dict[str, Any]


class Metric:
    """Accumulates sums over a split; ``state`` is all-reduced across workers before ``compute``."""

    def update(self, pred: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError

    def state(self) -> torch.Tensor:
        """A 1-d float64 tensor of sums; element-wise addition merges two accumulators."""
        raise NotImplementedError

    def load_state(self, state: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError
