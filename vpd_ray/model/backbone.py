"""The VPD backbone: Stable Diffusion v1's frozen VAE encoder and its UNet as a feature extractor.

One UNet pass at t = 1 on unscaled posterior-mode latents, text context through a learned adapter,
and four decoder feature maps tapped with forward hooks (VPD.md, "Verified facts"). The UNet's
final norm / conv are removed (``conv_norm_out=None``, ``conv_out=Identity``) so its output *is* f1;
the VAE's decoder is removed because only ``encode`` is ever used. Optional cross-attention maps come
from a diffusers attention processor (``vpd_ray.model.attention``). Everything stays a stock
diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, so weights load with diffusers' own code.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpd_ray.errors import first_line
from vpd_ray.model.attention import AttentionMapStore, cross_attention_processors, request_maps

SOURCES = ("tiny", "pretrained", "single_file")
SD_V1_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_V1_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
PAD_MULTIPLE = 64  # the UNet halves the 1/8 latent three times: image sides must divide by 64
TAP_STRIDES = (8, 16, 32, 64)
# (tap, module path in UNet2DConditionModel); f1 is the UNet output itself (after up_blocks[3]).
TAP_MODULES = (("f2", "up_blocks.2.attentions.1"), ("f3", "up_blocks.1.attentions.1"), ("f4", "up_blocks.0.resnets.1"))
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass
class BackboneConfig:
    """How to build a :class:`VPDBackbone`. Field names are permanent YAML keys (``model.backbone.*``)."""

    source: str = "tiny"  # "tiny" | "pretrained" | "single_file"
    # pretrained: diffusers SD v1 folder (unet/, vae/) or hub id; single_file: original .ckpt/.safetensors
    path: str | None = None
    # single_file only: LOCAL diffusers SD v1 folder whose unet/ and vae/ configs describe the checkpoint
    # (diffusers would otherwise fetch them from the hub)
    config_path: str | None = None
    # tiny only: random weights, SD v1 block structure, few channels (tests and the sample run)
    tiny_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 64])
    tiny_vae_channels: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 16, 16])
    tiny_text_dim: int = 32
    tiny_heads: int = 2
    seed: int = 0
    # cross-attention maps: keep maps with h*w <= (padded side / attn_map_divisor)^2 (VPD: 16)
    attn_map_divisor: int = 16
    # The UNet's input is latents x latent_scale. VPD feeds unscaled latents (1.0); SD v1 was trained on
    # latents x 0.18215, which TADP restores ("corrected latent scaling").
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"backbone source {self.source!r} is not one of {SOURCES}")
        if self.source != "tiny" and not self.path:
            raise ValueError(f"backbone source {self.source!r} needs a path to the SD v1 weights")
        if not self.latent_scale > 0:
            raise ValueError(f"model.backbone.latent_scale must be > 0, got {self.latent_scale}")

    def options(self) -> dict[str, Any]:
        """What :class:`VPDBackbone` takes besides its networks, whichever way they are built."""
        return {"attn_map_divisor": self.attn_map_divisor, "latent_scale": self.latent_scale}


class TextAdapter(nn.Module):
    """``e' = e + gamma * MLP(e)``; gamma starts at 1e-4 so training starts from the raw CLIP text."""

    def __init__(self, text_dim: int, gamma_init: float = 1e-4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
        self.gamma = nn.Parameter(torch.full((text_dim,), gamma_init))

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return text + self.gamma * self.fc(text)


class ClassEmbeddings(nn.Module):
    """Fixed per-class text vectors as a buffer ``weight [N+1, D]``; the last row, the mean of the N
    class rows, serves class id -1 (an image whose class is unknown, e.g. an arbitrary photo)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        if vectors.ndim != 2:
            raise ValueError(f"class embeddings must be [N, D], got shape {list(vectors.shape)}")
        self.register_buffer("weight", torch.cat([vectors, vectors.mean(0, keepdim=True)]).float())

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] - 1

    def forward(self, class_id: torch.Tensor) -> torch.Tensor:  # [B] int -> [B, D]
        """Ids in -1..N-1, checked where they are made (the depth task's transform and inference batch),
        not here: a check here would wait on the device every training step."""
        return self.weight[torch.where(class_id < 0, self.num_classes, class_id)]


class VPDBackbone(nn.Module):
    """Frozen VAE encoder + UNet at t = 1 -> ``[f1, f2, f3, f4]`` at strides 8/16/32/64 of the padded image."""

    def __init__(self, unet: nn.Module, vae: nn.Module, attn_map_divisor: int = 16, latent_scale: float = 1.0):
        super().__init__()
        _check_sd_v1(unet.config)
        unet.conv_norm_out = None  # VPD uses no output norm/conv: the UNet's output is then f1
        unet.conv_out = nn.Identity()
        vae.decoder = None  # only the encoder is used; keeps packages and memory small
        vae.post_quant_conv = None
        vae.requires_grad_(False)
        self.unet = unet
        self.vae = vae
        self.text_adapter = TextAdapter(unet.config.cross_attention_dim)
        self.class_embeddings = nn.ModuleDict()
        self.attn_map_divisor = attn_map_divisor
        self.latent_scale = latent_scale
        self._attn_store = AttentionMapStore()
        unet.set_attn_processor(cross_attention_processors(unet, self._attn_store))
        self._taps = _TapStore()
        for tap, path in TAP_MODULES:
            unet.get_submodule(path).register_forward_hook(_TapHook(self._taps, tap))

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> "VPDBackbone":
        if cfg.source == "tiny":
            return cls.tiny(cfg)
        if cfg.source == "pretrained":
            return cls.from_pretrained(cfg.path, **cfg.options())
        return cls.from_single_file(cfg.path, cfg.config_path, **cfg.options())

    @classmethod
    def tiny(cls, cfg: BackboneConfig | None = None) -> "VPDBackbone":
        """Random weights, SD v1 block structure (3 cross-attention levels + 1 plain), few channels."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cfg = cfg or BackboneConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet = UNet2DConditionModel(**tiny_unet_config(cfg))
            vae = AutoencoderKL(**tiny_vae_config(cfg))
            return cls(unet, vae, **cfg.options())

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> "VPDBackbone":
        """A diffusers Stable Diffusion v1 folder (``unet/``, ``vae/``) or hub id."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if os.path.exists(path):
            _check_diffusers_folder(path)
        elif not _HUB_ID.match(path):
            raise FileNotFoundError(f"SD weights path {path!r} does not exist (and is not a hub id like org/name)")
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load SD v1 UNet/VAE from {path!r}: {first_line(err)}") from None
        return cls(unet, vae, **options)

    @classmethod
    def from_single_file(cls, path: str, config_path: str | None, **options: Any) -> "VPDBackbone":
        """An original-layout SD checkpoint, converted by diffusers' own single-file code (offline)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if not config_path:
            raise ValueError(
                "source 'single_file' needs config_path: a local diffusers SD v1 folder with unet/ and vae/ "
                "configs (without it diffusers tries to fetch the configs from the hub)"
            )
        _check_diffusers_folder(config_path)
        checkpoint = read_original_checkpoint(path)
        kwargs: dict[str, Any] = dict(config=config_path, local_files_only=True)
        try:
            unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **kwargs)
            vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"cannot convert {path!r} with the UNet/VAE configs of {config_path!r}: {first_line(err)}"
            ) from None
        return cls(unet, vae, **options)

    # --- interface --------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    def feature_info(self, context_tokens: int = 0) -> list[dict[str, int]]:
        """Channels and strides of ``[f1, f2, f3, f4]``; T attention-map channels join f2 and f3."""
        c = self.unet.config.block_out_channels
        extra = (0, context_tokens, context_tokens, 0)
        return [{"num_chs": c[i] + extra[i], "reduction": TAP_STRIDES[i]} for i in range(4)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the UNet (diffusers' non-reentrant default, which the hooks need)."""
        if enable:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    @torch.no_grad()
    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> posterior-mode latents x ``latent_scale`` ``[B,4,Hp/8,Wp/8]`` (Hp = H
        padded to x64); VPD's 1.0 leaves them unscaled, bit for bit."""
        x = pad_to_multiple(image01 * 2 - 1, PAD_MULTIPLE)  # zero padding in [-1,1] space, as the reference
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        return latents if self.latent_scale == 1.0 else latents * self.latent_scale

    def forward_features(
        self, latents: torch.Tensor, context: torch.Tensor, with_attention_maps: bool = False
    ) -> list[torch.Tensor]:
        """Latents + raw text context ``[B,T,D]`` -> ``[f1, f2, f3, f4]`` (maps concatenated if asked)."""
        latents = latents.to(self.unet.dtype)  # the VAE may run outside the (bf16) engine in fp32
        timestep = torch.ones(latents.shape[0], dtype=torch.long, device=latents.device)
        # class-embedding rows arrive fp32 (buffers stay fp32 under bf16): cast here, at the point of use
        context = self.text_adapter(context.to(self.text_adapter.gamma.dtype))
        if with_attention_maps:  # keep maps with h*w <= (padded side / divisor)^2; latent = side / 8
            request_maps(context, latents.shape[-2] * latents.shape[-1] * 64 // self.attn_map_divisor**2)
        self._taps.features = {}
        self._attn_store.begin()
        try:
            f1 = self.unet(latents, timestep, encoder_hidden_states=context).sample
            taps = self._taps.features
        finally:
            self._taps.features = None
            maps = self._attn_store.end()
        feats = [f1, taps["f2"], taps["f3"], taps["f4"]]
        if with_attention_maps:
            feats[1] = _concat_map(feats[1], maps)
            feats[2] = _concat_map(feats[2], maps)
        return feats

    def forward(
        self, image01: torch.Tensor, context: torch.Tensor, with_attention_maps: bool = False
    ) -> list[torch.Tensor]:
        """Image in [0,1] -> features of the image padded to a multiple of 64."""
        return self.forward_features(self.encode(image01), context, with_attention_maps)



class _TapStore:
    """Where the tap hooks put features; ``features`` is a dict only during a backbone forward."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] | None = None


class _TapHook:
    """Forward hook saving a module's output as one tap. An object, not a closure, so that a
    deep copy of the backbone gets hooks that write into the copy's own store."""

    def __init__(self, store: _TapStore, tap: str):
        self.store, self.tap = store, tap

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.store.features is not None:  # not during checkpoint recomputation in backward
            self.store.features[self.tap] = output[0] if isinstance(output, tuple) else output


def _concat_map(feat: torch.Tensor, maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """Append the mean attention map of ``feat``'s resolution as T extra channels."""
    b, _, h, w = feat.shape
    if h * w not in maps:
        raise RuntimeError(f"no cross-attention maps at {h}x{w}; captured sizes (h*w): {sorted(maps)}")
    attn = maps[h * w].transpose(1, 2).reshape(b, -1, h, w)  # [B, HW, T] -> [B, T, h, w]
    return torch.cat([feat, attn.to(feat.dtype)], dim=1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``[..., H, W]`` at the bottom/right so both sides divide by ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


def tiny_unet_config(cfg: BackboneConfig) -> dict[str, Any]:
    """UNet2DConditionModel kwargs with SD v1's block layout and ``cfg``'s small sizes."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=SD_V1_DOWN_BLOCKS,
        up_block_types=SD_V1_UP_BLOCKS,
        block_out_channels=tuple(cfg.tiny_channels),
        layers_per_block=2,
        cross_attention_dim=cfg.tiny_text_dim,
        attention_head_dim=cfg.tiny_heads,  # diffusers' legacy name: SD v1's 8 here means 8 heads
        norm_num_groups=8,
    )


def tiny_vae_config(cfg: BackboneConfig) -> dict[str, Any]:
    """AutoencoderKL kwargs: 4 levels (latent = 1/8 of the image), 4 latent channels, like SD's VAE."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(cfg.tiny_vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )


def read_original_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Tensors of an original-layout SD checkpoint (safetensors, or a torch file read with weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SD checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
    for prefix in ("model.diffusion_model.", "first_stage_model."):
        if not any(key.startswith(prefix) for key in state):
            raise ValueError(
                f"{path!r} is not an original-layout SD v1 checkpoint: no key starts with {prefix!r} "
                f"(first keys: {list(state)[:5]})"
            )
    return state


def _check_diffusers_folder(path: str) -> None:
    configs = [f"{sub}/config.json" for sub in ("unet", "vae")]
    missing = [c for c in configs if not os.path.isfile(os.path.join(path, c))]
    if missing:
        raise ValueError(f"{path!r} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")


def _check_sd_v1(config: Any) -> None:
    """The tap positions assume SD v1's block layout; anything else is named in the error."""
    down, up = tuple(config.down_block_types), tuple(config.up_block_types)
    if down != SD_V1_DOWN_BLOCKS or up != SD_V1_UP_BLOCKS or config.layers_per_block != 2:
        raise ValueError(
            f"UNet is not SD v1-shaped: down {down}, up {up}, layers_per_block {config.layers_per_block}; "
            f"expected down {SD_V1_DOWN_BLOCKS}, up {SD_V1_UP_BLOCKS}, layers_per_block 2"
        )
