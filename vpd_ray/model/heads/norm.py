"""BatchNorm for the heads that keeps its statistics in fp32 when the engine runs in bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises in fp32 with fp32 running statistics, returning the input's dtype.

    A bf16 engine casts the affine weight and bias to bf16 but leaves buffers fp32. Kept in bf16
    (8 mantissa bits), the running statistics would drop every update below ~0.3% of their value, so
    those of a long run would be wrong; the reference keeps them in fp32. In fp32 this is
    ``nn.BatchNorm2d`` bit for bit, with the same state-dict keys (old packages and checkpoints load).
    Only the heads' setting is supported: affine, tracked statistics, a fixed momentum.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                           self.training, self.momentum, self.eps)  # fmt: skip
        return out.to(x.dtype)
