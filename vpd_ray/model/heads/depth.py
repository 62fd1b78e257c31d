"""VPD's NYUv2 depth head: fuse the four taps at stride 32, deconvolve back to the input size.

Attribute names follow the authors' model (``layer1``, ``layer2``, ``out_layer`` of their encoder,
``decoder.deconv_layers`` / ``decoder.conv_layers``, ``last_layer_depth``) so that their checkpoint
maps onto this module by a prefix change (``vpd_ray.model.authors_weights``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpd_ray.model.heads.norm import FP32BatchNorm2d


class DepthDecoder(nn.Module):
    """3 x [ConvTranspose2d k2 s2, BN, ReLU] -> conv3x3, BN, ReLU -> bilinear x2, x2 (stride 32 -> 1)."""

    def __init__(self, in_dim: int, out_dim: int, filters: int = 32, num_deconv: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_deconv):
            layers += [
                nn.ConvTranspose2d(in_dim if i == 0 else filters, filters, 2, stride=2, bias=False),
                FP32BatchNorm2d(filters),
                nn.ReLU(inplace=True),
            ]
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(
            nn.Conv2d(filters, out_dim, 3, padding=1), FP32BatchNorm2d(out_dim), nn.ReLU(inplace=True)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's mmcv init: normal(std=1e-3) convs with zero bias, BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(self.deconv_layers(x))
        for _ in range(2):  # two bilinear x2 steps, as the reference (one x4 step interpolates differently)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x


class DepthHead(nn.Module):
    """``[f1, f2, f3, f4]`` -> depth ``[B, 1, H, W]`` in (0, max_depth) metres.

    Neck width is ``8 * head_dim`` (1536 for VPD's 192) and the decoder width ``head_dim``;
    ``norm_groups`` is the GroupNorm group count on f1's channels and on the neck.
    """

    def __init__(
        self,
        feature_info: list[dict[str, int]],
        head_dim: int = 192,
        max_depth: float = 10.0,
        deconv_filters: int = 32,
        norm_groups: int = 16,
    ):
        super().__init__()
        c1, c2, c3, c4 = (f["num_chs"] for f in feature_info)
        neck_dim = 8 * head_dim
        for name, channels in (("f1", c1), ("neck", neck_dim)):
            if channels % norm_groups:
                raise ValueError(f"{name} width {channels} is not divisible by norm_groups={norm_groups}")
        self.max_depth = max_depth
        self.layer1 = nn.Sequential(  # stride 8 -> 32
            nn.Conv2d(c1, c1, 3, stride=2, padding=1),
            nn.GroupNorm(norm_groups, c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, stride=2, padding=1),
        )
        self.layer2 = nn.Sequential(nn.Conv2d(c2, c2, 3, stride=2, padding=1))  # stride 16 -> 32
        self.out_layer = nn.Sequential(
            nn.Conv2d(c1 + c2 + c3 + c4, neck_dim, 1), nn.GroupNorm(norm_groups, neck_dim), nn.ReLU()
        )
        self._init_neck()
        self.decoder = DepthDecoder(neck_dim, head_dim, deconv_filters)
        self.last_layer_depth = nn.Sequential(
            nn.Conv2d(head_dim, head_dim, 3, padding=1), nn.ReLU(), nn.Conv2d(head_dim, 1, 3, padding=1)
        )
        for m in self.last_layer_depth.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def _init_neck(self) -> None:
        """Truncated normal std 0.02, zero bias (the reference encoder's ``_init_weights``)."""
        for m in (*self.layer1, *self.layer2, *self.out_layer):
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], image_hw: tuple[int, int]) -> torch.Tensor:
        f1, f2, f3, f4 = feats
        f34 = torch.cat([f3, F.interpolate(f4, scale_factor=2)], dim=1)  # nearest, as the reference
        x = self.out_layer(torch.cat([self.layer1(f1), self.layer2(f2), f34], dim=1))  # [B, 8*head_dim, Hp/32, Wp/32]
        h, w = image_hw
        x = x[..., : math.ceil(h / 32), : math.ceil(w / 32)]  # cut the x64 padding (480: 16 -> 15)
        depth = torch.sigmoid(self.last_layer_depth(self.decoder(x))) * self.max_depth
        return depth[..., :h, :w]
