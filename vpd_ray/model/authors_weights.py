"""Loading the authors' released VPD depth checkpoint into a ``VPDModel``.

Their ``model`` dict holds the ldm UNet (``encoder.unet.unet.diffusion_model.*``), the ldm VAE
(``encoder.encoder_vq.*``), the text adapter, the class embeddings, the neck and the head. UNet and
VAE keys go through diffusers' own original -> diffusers conversion; the rest is a prefix change,
because ``DepthHead`` keeps the authors' module names. Every source key ends up in the report as
mapped or as dropped with a reason; a key nobody expects is an error that lists it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

AUTHORS_UNET = "encoder.unet.unet.diffusion_model."
AUTHORS_VAE = "encoder.encoder_vq."
LDM_UNET, LDM_VAE = "model.diffusion_model.", "first_stage_model."  # the prefixes diffusers' converters expect
# authors' prefix -> vpd_ray prefix ("{head}" = heads.<task name>.)
RENAMES = (
    ("encoder.text_adapter.fc.", "backbone.text_adapter.fc."),
    ("encoder.layer1.", "{head}layer1."),
    ("encoder.layer2.", "{head}layer2."),
    ("encoder.out_layer.", "{head}out_layer."),
    ("decoder.", "{head}decoder."),
    ("last_layer_depth.", "{head}last_layer_depth."),
)
# parts of the original networks VPD never runs (the backbone does not even build them)
DROPPED = (
    (AUTHORS_UNET + "out.", "UNet output norm/conv: VPD taps the decoder before them"),
    (AUTHORS_VAE + "decoder.", "VAE decoder: only the encoder is used"),
    (AUTHORS_VAE + "post_quant_conv.", "VAE post_quant_conv: decoder side, unused"),
)


@dataclasses.dataclass
class RemapReport:
    """What happened to every key of the source checkpoint."""

    mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> vpd_ray key
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> reason

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines = [f"mapped {len(self.mapped)} keys, dropped {len(self.dropped)}"]
        lines += [f"  dropped {n}: {reason}" for reason, n in reasons.items()]
        return "\n".join(lines)


def remap_vpd_depth_state_dict(
    state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    head: str = "depth",
    class_set: str = "nyu",
) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """The authors' depth ``model`` dict -> a ``VPDModel`` state dict, plus the per-key report.

    ``unet_config`` / ``vae_config``: the diffusers configs of the target UNet / VAE (the converters
    need ``layers_per_block`` and the block types). Class embeddings ``[N, D]`` or ``[N, 1, D]`` get
    the mean row appended (``ClassEmbeddings``' id -1).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    report = RemapReport()
    mapped: dict[str, torch.Tensor] = {}
    rest = dict(state)
    for prefix, reason in DROPPED:
        for key in [k for k in rest if k.startswith(prefix)]:
            report.dropped[key] = reason
            del rest[key]
    for src, ldm, dst, convert, config in (
        (AUTHORS_UNET, LDM_UNET, "backbone.unet.", convert_ldm_unet_checkpoint, unet_config),
        (AUTHORS_VAE, LDM_VAE, "backbone.vae.", convert_ldm_vae_checkpoint, vae_config),
    ):
        part = {ldm + k[len(src) :]: rest.pop(k) for k in [k for k in rest if k.startswith(src)]}
        converted = _convert_tracked(convert, part, dict(config))
        for ldm_key in part:
            if ldm_key not in converted:  # a key diffusers' converter does not know: unexpected
                rest[src + ldm_key[len(ldm) :]] = part[ldm_key]
        for ldm_key, (key, value) in converted.items():
            report.mapped[src + ldm_key[len(ldm) :]] = dst + key
            mapped[dst + key] = value
    head_prefix = f"heads.{head}."
    for key in list(rest):
        target = _renamed(key, head_prefix, class_set)
        if target is not None:
            value = rest.pop(key)
            if key == "encoder.class_embeddings":
                value = _with_mean_row(value)
            report.mapped[key] = target
            mapped[target] = value
    if rest:
        raise ValueError(f"unexpected keys in the VPD depth checkpoint ({len(rest)}): {sorted(rest)}")
    return mapped, report


def load_vpd_depth_checkpoint(path: str, model: torch.nn.Module, head: str = "depth") -> RemapReport:
    """Load the authors' ``{"model": state_dict}`` file (``torch.load`` with ``weights_only=True``) into
    ``model`` (a ``VPDModel`` with a depth task named ``head``). Every model tensor must be covered."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path!r} is not a VPD checkpoint: expected a dict with a 'model' entry, got {keys}")
    backbone = model.backbone
    class_set = model.tasks[head].cfg.class_set
    mapped, report = remap_vpd_depth_state_dict(
        ckpt["model"], backbone.unet.config, backbone.vae.config, head=head, class_set=class_set
    )
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    wrong = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}" for k, v in mapped.items()
             if k in own and v.shape != own[k].shape]  # fmt: skip
    extra = sorted(set(mapped) - set(own))
    if missing or wrong or extra:
        raise ValueError(
            f"{path!r} does not fit the model: missing {missing}, shape mismatches {wrong}, not in model {extra}"
        )
    model.load_state_dict(mapped)
    return report


def _convert_tracked(
    convert: Callable[[dict, dict], dict], part: dict[str, torch.Tensor], config: dict
) -> dict[str, tuple[str, torch.Tensor]]:
    """Run a diffusers converter and recover which source key each output came from.

    The converters move tensors (or take views that start at the same address), so the data pointer
    identifies the source. Source keys missing from the result were not used by the converter.
    """
    unique: dict[str, torch.Tensor] = {}
    by_address: dict[int, str] = {}
    for key, value in part.items():
        if value.data_ptr() in by_address:  # aliased tensors: give each its own address
            value = value.clone()
        by_address[value.data_ptr()] = key
        unique[key] = value
    converted = convert(unique, config) if unique else {}
    return {by_address[v.data_ptr()]: (k, v) for k, v in converted.items()}


def _renamed(key: str, head_prefix: str, class_set: str) -> str | None:
    if key == "encoder.gamma":
        return "backbone.text_adapter.gamma"
    if key == "encoder.class_embeddings":
        return f"backbone.class_embeddings.{class_set}.weight"
    for src, dst in RENAMES:
        if key.startswith(src):
            return dst.format(head=head_prefix) + key[len(src) :]
    return None


def _with_mean_row(vectors: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` or ``[N, 1, D]`` -> ``[N + 1, D]`` (last row: mean of the N)."""
    if vectors.ndim == 3 and vectors.shape[1] == 1:
        vectors = vectors[:, 0]
    if vectors.ndim != 2:
        raise ValueError(f"class embeddings must be [N, D] or [N, 1, D], got {list(vectors.shape)}")
    return torch.cat([vectors, vectors.mean(0, keepdim=True)]).float()
