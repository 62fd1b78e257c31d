"""Loading the authors' released VPD checkpoints (NYUv2 depth, ADE20K segmentation, RefCOCO referring
segmentation) into a ``VPDModel``.

Each release keeps the ldm UNet, the ldm VAE, the text adapter (``fc`` + ``gamma``), the class
embeddings (depth, segmentation) and the task's head, under prefixes of its own: one
:class:`AuthorsLayout` per task says where (derived from github.com/wl-zhao/VPD, see each table).
UNet and VAE keys go through diffusers' own original -> diffusers conversion; the rest is renamed by
the layout's rules. Every source key ends up in the report as mapped or as dropped with a reason; a
key no rule expects is an error that lists it, and so is a model tensor the file does not cover.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

LDM_UNET, LDM_VAE = "model.diffusion_model.", "first_stage_model."  # the prefixes diffusers' converters expect
ADAPTER = "backbone.text_adapter."
DDP_PREFIX = "module."


@dataclasses.dataclass(frozen=True)
class AuthorsLayout:
    """Where one released checkpoint keeps what.

    ``renames`` / ``dropped``: (regular expression matching a whole source key, target or reason); a
    target may use the groups (``\\1``) and ``{head}`` (``heads.<task name>.``). UNet and VAE keys
    (under ``unet`` / ``vae``) are converted by diffusers before the rules see the rest.
    """

    task: str  # the vpd_ray task type (``Task.name``) whose head the checkpoint's head becomes
    entry: str  # top-level key of the file that holds the state dict
    unet: str  # prefix of the ldm UNet (``diffusion_model``) keys
    vae: str  # prefix of the ldm AutoencoderKL keys
    renames: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]
    class_embeddings: str | None = None  # key of the class-embedding buffer [N, D] / [N, 1, D], if any


def _unused_sd_parts(unet: str, vae: str) -> tuple[tuple[str, str], ...]:
    """Parts of the original networks VPD never runs (the backbone does not even build them)."""
    return (
        (re.escape(unet + "out.") + ".+", "UNet output norm/conv: VPD taps the decoder before them"),
        (re.escape(vae + "decoder.") + ".+", "VAE decoder: only the encoder is used"),
        (re.escape(vae + "post_quant_conv.") + ".+", "VAE post_quant_conv: decoder side, unused"),
    )


# depth/models_depth/model.py: VPDDepth = encoder (VPDDepthEncoder: encoder_vq, unet = UNetWrapper whose
# .unet is ldm's DiffusionWrapper, text_adapter, gamma, class_embeddings buffer, layer1, layer2,
# out_layer) + decoder + last_layer_depth; depth/train.py saves {"model": state_dict}. DepthHead keeps
# those module names, so the head is a prefix change.
_DEPTH_UNET, _DEPTH_VAE = "encoder.unet.unet.diffusion_model.", "encoder.encoder_vq."
DEPTH = AuthorsLayout(
    task="depth",
    entry="model",
    unet=_DEPTH_UNET,
    vae=_DEPTH_VAE,
    renames=(
        (r"encoder\.text_adapter\.fc\.(.+)", ADAPTER + r"fc.\1"),
        (r"encoder\.gamma", ADAPTER + "gamma"),
        (r"encoder\.(layer1|layer2|out_layer)\.(.+)", r"{head}\1.\2"),
        (r"(decoder|last_layer_depth)\.(.+)", r"{head}\1.\2"),
    ),
    # the authors delete the UNet's `out` and the VAE decoder before saving; variants of the file keep them
    dropped=_unused_sd_parts(_DEPTH_UNET, _DEPTH_VAE),
    class_embeddings="encoder.class_embeddings",
)

# segmentation/models/vpd_seg.py: VPDSeg (an mmseg BaseSegmentor) holds encoder_vq (decoder deleted),
# unet (UNetWrapper -> DiffusionWrapper -> diffusion_model; `out` kept), sd_model (the emptied
# LatentDiffusion: model, first_stage_model and cond_stage_model removed, its registered noise-schedule
# buffers left), the class_embeddings buffer, gamma, text_adapter, neck (mmseg FPN) and decode_head
# (mmseg FPNHead; config fpn_vpd_sd1-5_512x512_gpu8x2.py, no auxiliary head). mmcv's ConvModule names
# its conv `conv` and its norm `bn` (SyncBN -> "bn"); the FPN neck has no norm; FPNHead's scale_heads
# are Sequential(ConvModule, Upsample, ...). mmcv's save_checkpoint writes
# {"meta": ..., "state_dict": ..., ["optimizer": ...]}. Ours: FPNNeck's plain Conv2d's, FPNHead's
# Sequential(conv, BN, ReLU) blocks in the same positions, conv_seg; SemanticFPNHead = neck + head.
# Not confirmed on the released file itself (derived from the code above): the sd_model buffers, and the
# head width: VPD's copy of _base_/models/fpn_r50.py sets FPNHead channels=256 (mmseg's own: 128), so
# the file should need tasks.seg.head_channels=256; another width is a shape-mismatch error naming it.
_TOP_UNET, _TOP_VAE = "unet.unet.diffusion_model.", "encoder_vq."  # VPDSeg and VPDRefer alike
# ldm DDPM.register_schedule's persistent buffers (lvlb_weights is non-persistent; scale_factor is a
# plain float with scale_by_std=False, and v1-inference.yaml has use_ema: False, so no model_ema)
LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip
SEG = AuthorsLayout(
    task="seg",
    entry="state_dict",
    unet=_TOP_UNET,
    vae=_TOP_VAE,
    renames=(
        (r"text_adapter\.fc\.(.+)", ADAPTER + r"fc.\1"),
        (r"gamma", ADAPTER + "gamma"),
        (r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", r"{head}neck.\1.\2.\3"),
        (r"decode_head\.scale_heads\.(\d+)\.(\d+)\.conv\.weight", r"{head}head.scale_heads.\1.\2.0.weight"),
        (r"decode_head\.scale_heads\.(\d+)\.(\d+)\.bn\.(.+)", r"{head}head.scale_heads.\1.\2.1.\3"),
        (r"decode_head\.conv_seg\.(weight|bias)", r"{head}head.conv_seg.\1"),
    ),
    dropped=_unused_sd_parts(_TOP_UNET, _TOP_VAE) + (
        (r"sd_model\.(" + "|".join(LDM_SCHEDULE_BUFFERS) + ")",
         "LatentDiffusion noise-schedule buffer (VPDSeg keeps the emptied sd_model): one noiseless pass at t = 1"),
    ),
    class_embeddings="class_embeddings",
)

# refer/models_refer/model.py: VPDRefer holds encoder_vq (decoder deleted), unet (UNetWrapper; `out`
# kept), text_adapter (TextAdapterRefer: the same fc), classifier (refer/lib/mask_predictor.py's
# SimpleDecoding: conv{1,2}_k, bn{1,2}_k for k = 4, 3, 2, then conv1_1 to 2 classes) and gamma; no
# class embeddings. The CLIP text model is a separate frozen CLIPTextModel ("openai/clip-vit-large-patch14"),
# not in the file. refer/train.py saves {"model", "optimizer", "epoch", "args" (argparse.Namespace),
# "lr_scheduler"}, the model from DDP's .module (no "module." prefix; one is stripped anyway, below).
# Ours: ReferDecoder's fuse{k} = Sequential(conv, BN, ReLU, conv, BN, ReLU), classifier. Not confirmed on
# the released file itself (refer/README.md links none in the sources read): derived from the code above.
REFER = AuthorsLayout(
    task="refer",
    entry="model",
    unet=_TOP_UNET,
    vae=_TOP_VAE,
    renames=(
        (r"text_adapter\.fc\.(.+)", ADAPTER + r"fc.\1"),
        (r"gamma", ADAPTER + "gamma"),
        (r"classifier\.conv1_([234])\.weight", r"{head}fuse\1.0.weight"),
        (r"classifier\.bn1_([234])\.(.+)", r"{head}fuse\1.1.\2"),
        (r"classifier\.conv2_([234])\.weight", r"{head}fuse\1.3.weight"),
        (r"classifier\.bn2_([234])\.(.+)", r"{head}fuse\1.4.\2"),
        (r"classifier\.conv1_1\.(weight|bias)", r"{head}classifier.\1"),
    ),
    dropped=_unused_sd_parts(_TOP_UNET, _TOP_VAE),
)

LAYOUTS: dict[str, AuthorsLayout] = {layout.task: layout for layout in (DEPTH, SEG, REFER)}


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


def remap_authors_state_dict(
    state: Mapping[str, torch.Tensor],
    layout: AuthorsLayout | str,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    head: str | None = None,
    class_set: str | None = None,
) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """The state dict of an authors' checkpoint (``layout``, or its task name) -> a ``VPDModel`` state
    dict, plus the per-key report.

    ``unet_config`` / ``vae_config``: the diffusers configs of the target UNet / VAE (the converters
    need ``layers_per_block`` and the block types); ``head``: the target task's name (default: the
    layout's task); ``class_set``: the class-embedding set the embeddings become, for a layout with
    them. Class embeddings ``[N, D]`` or ``[N, 1, D]`` get the mean row appended (``ClassEmbeddings``' id -1).
    A ``module.`` prefix on every key (a DDP wrapper's) is taken off first.
    """
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    if layout.class_embeddings is not None and class_set is None:
        raise ValueError(f"the VPD {layout.task} checkpoint has class embeddings: name the class_set they become")
    # a DDP wrapper's prefix on every key (the authors' depth/test.py strips it the same way); the
    # report keeps the file's own key names
    ddp = DDP_PREFIX if state and all(key.startswith(DDP_PREFIX) for key in state) else ""
    mapped, report = _remap(
        {key[len(ddp) :]: value for key, value in state.items()}, layout, unet_config, vae_config, head, class_set, ddp
    )
    if ddp:
        report.mapped = {ddp + key: target for key, target in report.mapped.items()}
        report.dropped = {ddp + key: reason for key, reason in report.dropped.items()}
    return mapped, report


def _remap(
    state: dict[str, torch.Tensor],
    layout: AuthorsLayout,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    head: str | None,
    class_set: str | None,
    ddp: str,
) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """:func:`remap_authors_state_dict` of ``state`` without the DDP prefix ``ddp`` (errors name the file's keys)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    report = RemapReport()
    mapped: dict[str, torch.Tensor] = {}
    rest = dict(state)
    if not any(key.startswith(layout.unet) for key in rest):
        raise ValueError(
            f"no key starts with {layout.unet!r}: not the authors' VPD {layout.task} checkpoint "
            f"(first keys: {[ddp + k for k in list(rest)[:5]]}){_unet_hint(rest, layout)}"
        )
    for pattern, reason in layout.dropped:
        for key in [k for k in rest if re.fullmatch(pattern, k)]:
            report.dropped[key] = reason
            del rest[key]
    for src, ldm, dst, convert, config in (
        (layout.unet, LDM_UNET, "backbone.unet.", convert_ldm_unet_checkpoint, unet_config),
        (layout.vae, LDM_VAE, "backbone.vae.", convert_ldm_vae_checkpoint, vae_config),
    ):
        part = {ldm + k[len(src) :]: rest.pop(k) for k in [k for k in rest if k.startswith(src)]}
        converted = _convert_tracked(convert, part, dict(config))
        for ldm_key, value in part.items():
            if ldm_key not in converted:  # a key diffusers' converter does not know: unexpected
                rest[src + ldm_key[len(ldm) :]] = value
        for ldm_key, (key, value) in converted.items():
            report.mapped[src + ldm_key[len(ldm) :]] = dst + key
            mapped[dst + key] = value
    head_prefix = f"heads.{head or layout.task}."
    for key in list(rest):
        if key == layout.class_embeddings:
            target, value = f"backbone.class_embeddings.{class_set}.weight", _with_mean_row(rest.pop(key))
        else:
            target = _renamed(key, layout.renames, head_prefix)
            if target is None:
                continue
            value = rest.pop(key)
        report.mapped[key] = target
        mapped[target] = value
    if rest:
        unexpected = sorted(ddp + key for key in rest)
        raise ValueError(f"unexpected keys in the VPD {layout.task} checkpoint ({len(rest)}): {unexpected}")
    return mapped, report


def remap_vpd_depth_state_dict(
    state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    head: str = "depth",
    class_set: str = "nyu",
) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """:func:`remap_authors_state_dict` of the depth checkpoint's ``model`` dict."""
    return remap_authors_state_dict(state, DEPTH, unet_config, vae_config, head=head, class_set=class_set)


def load_authors_checkpoint(
    path: str, model: torch.nn.Module, head: str | None = None, layout: AuthorsLayout | str | None = None
) -> RemapReport:
    """Load an authors' released checkpoint into ``model`` (a ``VPDModel``); every model tensor must
    be covered, and every file key is mapped or dropped with a reason (the returned report).

    ``head``: the task to load into (default: the model's only task); ``layout``: default the one of
    that task's type (:data:`LAYOUTS`: depth, seg, refer). The file is read with ``weights_only=True``
    (``argparse.Namespace`` allowed: the refer checkpoint keeps its training arguments), memory-mapped.
    """
    head = _only_task(model) if head is None else head
    task = model.tasks[head]
    if layout is None:
        if task.name not in LAYOUTS:
            raise ValueError(f"the authors released no {task.name!r} checkpoint; layouts known: {sorted(LAYOUTS)}")
        layout = LAYOUTS[task.name]
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    if layout.task != task.name:
        raise ValueError(f"task {head!r} is a {task.name} task: the VPD {layout.task} checkpoint layout does not fit it")
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or layout.entry not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path!r} is not the authors' VPD {layout.task} checkpoint: expected a dict with a "
                         f"{layout.entry!r} entry, got {keys}{_entry_hint(ckpt, layout)}")  # fmt: skip
    backbone = model.backbone
    class_set = task.cfg.class_set if layout.class_embeddings is not None else None
    mapped, report = remap_authors_state_dict(
        ckpt[layout.entry], layout, backbone.unet.config, backbone.vae.config, head=head, class_set=class_set
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


def load_vpd_depth_checkpoint(path: str, model: torch.nn.Module, head: str = "depth") -> RemapReport:
    """The authors' NYUv2 depth file (``{"model": state_dict}``) into ``model``'s depth task ``head``."""
    return load_authors_checkpoint(path, model, head, DEPTH)


def load_vpd_seg_checkpoint(path: str, model: torch.nn.Module, head: str = "seg") -> RemapReport:
    """The authors' ADE20K file (mmseg's ``{"meta", "state_dict"}``) into ``model``'s seg task ``head``."""
    return load_authors_checkpoint(path, model, head, SEG)


def load_vpd_refer_checkpoint(path: str, model: torch.nn.Module, head: str = "refer") -> RemapReport:
    """The authors' RefCOCO file (``{"model", "optimizer", "args", ...}``) into ``model``'s refer task ``head``."""
    return load_authors_checkpoint(path, model, head, REFER)


def _only_task(model: torch.nn.Module) -> str:
    names = sorted(model.tasks)
    if len(names) != 1:
        raise ValueError(f"an authors' VPD checkpoint holds one task, this model has {names}: name the head to load")
    return names[0]


def _read(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``, mmapped (optimizer states stay on disk) where the
    file's format allows it; a refused global is a ValueError naming it."""
    import argparse
    import pickle

    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # only the pre-zip format cannot be mmapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            why = next((line.split("error:", 1)[-1].strip() for line in str(err).splitlines()
                        if "Unsupported global" in line), "see torch.load(weights_only=True)")  # fmt: skip
            raise ValueError(f"{path!r} cannot be read with weights_only=True: {why}") from None


def _entry_hint(ckpt: Any, layout: AuthorsLayout) -> str:
    others = sorted({other.task for other in LAYOUTS.values() if isinstance(ckpt, dict) and other.entry in ckpt})
    return f" (that is how the authors' {' / '.join(others)} checkpoint is stored)" if others else ""


def _unet_hint(state: Mapping[str, Any], layout: AuthorsLayout) -> str:
    others = sorted({other.task for other in LAYOUTS.values()
                     if other.unet != layout.unet and any(k.startswith(other.unet) for k in state)})  # fmt: skip
    return f"; its UNet is where the authors' {' / '.join(others)} checkpoint keeps it" if others else ""


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


def _renamed(key: str, renames: tuple[tuple[str, str], ...], head_prefix: str) -> str | None:
    for pattern, target in renames:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(target.replace("{head}", head_prefix))
    return None


def _with_mean_row(vectors: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` or ``[N, 1, D]`` -> ``[N + 1, D]`` (last row: mean of the N)."""
    if vectors.ndim == 3 and vectors.shape[1] == 1:
        vectors = vectors[:, 0]
    if vectors.ndim != 2:
        raise ValueError(f"class embeddings must be [N, D] or [N, 1, D], got {list(vectors.shape)}")
    return torch.cat([vectors, vectors.mean(0, keepdim=True)]).float()
