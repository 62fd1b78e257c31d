"""Top-down decoder for VPD referring segmentation (RefCOCO family).

The reference (VPD ``refer``, from LAVT's ``SimpleDecoding``) fuses the coarsest feature into the
next finer one three times: upsample (bilinear, ``align_corners=True``), concatenate, two
conv3x3-BN-ReLU blocks of ``hidden`` channels (``1280 // 2 = 640`` for SD), then a conv1x1 to two
classes (background, object) and a bilinear resize to the input. Reference layer names map by a
pure rename: ``conv{1,2}_k`` / ``bn{1,2}_k`` -> ``fuse{k}.{0,3}`` / ``fuse{k}.{1,4}`` (k = 4, 3, 2) and
``conv1_1`` -> ``classifier``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpd_ray.model.heads.norm import FP32BatchNorm2d


def _fuse_block(in_ch: int, hidden: int) -> nn.Sequential:
    """Two conv3x3 (no bias) + BN + ReLU, the reference's ``convX_k / bnX_k / reluX_k`` pair."""
    return nn.Sequential(
        nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False),
        FP32BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        FP32BatchNorm2d(hidden),
        nn.ReLU(),
    )


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class ReferDecoder(nn.Module):
    """``[f1, f2, f3, f4]`` (channels from ``feature_info``, attention maps included) -> logits ``[B,2,H,W]``.

    ``hidden`` defaults to half the coarsest feature's channels, the reference's ``dims[-1] // 2``.
    Features are for the image padded to a multiple of 64; the logits are resized to the padded size
    and cropped back to ``image_hw``.
    """

    def __init__(self, feature_info: Sequence[dict], hidden: int | None = None, num_classes: int = 2):
        super().__init__()
        if len(feature_info) != 4:
            raise ValueError(f"ReferDecoder needs 4 feature levels, got {len(feature_info)}")
        c1, c2, c3, c4 = (int(info["num_chs"]) for info in feature_info)
        hidden = hidden or c4 // 2
        self.finest_reduction = int(feature_info[0]["reduction"])
        self.fuse4 = _fuse_block(c4 + c3, hidden)  # stride 32
        self.fuse3 = _fuse_block(hidden + c2, hidden)  # stride 16
        self.fuse2 = _fuse_block(hidden + c1, hidden)  # stride 8
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], image_hw: tuple[int, int]) -> torch.Tensor:
        f1, f2, f3, f4 = feats
        x = self.fuse4(torch.cat([_upsample_to(f4, f3), f3], dim=1))
        x = self.fuse3(torch.cat([_upsample_to(x, f2), f2], dim=1))
        x = self.fuse2(torch.cat([_upsample_to(x, f1), f1], dim=1))
        logits = self.classifier(x)  # [B, 2, Hp/8, Wp/8]
        padded_hw = (logits.shape[2] * self.finest_reduction, logits.shape[3] * self.finest_reduction)
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=True)
        return logits[:, :, : image_hw[0], : image_hw[1]]
