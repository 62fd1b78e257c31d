"""Semantic FPN head for VPD segmentation (ADE20K).

The reference run is mmseg's ``FPN`` neck + ``FPNHead`` (configs ``fpn_r50.py`` with
``in_channels=[320, 790, 1430, 1280]``): the neck maps the four backbone features to 256 channels with
a top-down pathway; the head brings every level to the finest (stride 8) with ``log2(stride/8)``
conv3x3-BN-ReLU-up2 blocks, sums them, and classifies with dropout 0.1 + conv1x1. Module names
follow mmseg (``lateral_convs``, ``fpn_convs``, ``scale_heads``, ``conv_seg``) so that a reference
checkpoint maps onto this head by a prefix rename.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpd_ray.model.heads.norm import FP32BatchNorm2d


class FPNNeck(nn.Module):
    """mmseg ``FPN`` (no norm, nearest top-down upsampling): ``C_i`` channels -> ``out_channels`` each."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(conv.weight)  # mmseg FPN's init_cfg
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule default
    return nn.Sequential(conv, FP32BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class FPNHead(nn.Module):
    """mmseg ``FPNHead``: per-level conv+upsample to the finest level, sum, dropout, 1x1 classifier."""

    def __init__(self, reductions: Sequence[int], in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for reduction in reductions:
            blocks: list[nn.Module] = []
            for k in range(max(1, int(math.log2(reduction) - math.log2(reductions[0])))):
                blocks.append(_conv_bn_relu(in_channels if k == 0 else channels, channels))
                if reduction != reductions[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, x in zip(self.scale_heads[1:], feats[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


class SemanticFPNHead(nn.Module):
    """Neck + head; returns class logits ``[B, K, H, W]`` at the (unpadded) image size.

    ``feature_info`` is the backbone's list of ``{"num_chs", "reduction"}`` for the context length
    the task uses (channels include the attention maps). Features arrive for the image padded to a
    multiple of 64; logits are upsampled to the padded size and the padding is cut off, which keeps
    pixel geometry exact (an ``H x W`` resize of padded logits would stretch them).
    """

    def __init__(
        self,
        feature_info: Sequence[dict],
        num_classes: int,
        neck_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.reductions = [int(info["reduction"]) for info in feature_info]
        self.neck = FPNNeck([int(info["num_chs"]) for info in feature_info], neck_channels)
        self.head = FPNHead(self.reductions, neck_channels, channels, num_classes, dropout)

    def forward(self, feats: Sequence[torch.Tensor], image_hw: tuple[int, int]) -> torch.Tensor:
        logits = self.head(self.neck(feats))  # [B, K, Hp/8, Wp/8]
        padded_hw = (logits.shape[2] * self.reductions[0], logits.shape[3] * self.reductions[0])
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
        return logits[:, :, : image_hw[0], : image_hw[1]]
