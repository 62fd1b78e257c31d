"""Test helper: diffusers -> original (CompVis ldm) key layout for SD v1 UNet / VAE state dicts.

diffusers ships only the original -> diffusers direction; tests need the inverse to write
original-layout checkpoints from tiny models. ``test_backbone`` checks that diffusers' own
conversion maps these keys back exactly, so this inverse cannot drift silently.
"""

from __future__ import annotations

import torch

RESNET_RENAMES = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)  # fmt: skip
VAE_ATTN_RENAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _unet_rules(levels: int = 4, layers: int = 2) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is_resnet) for an SD v1-shaped UNet."""
    rules = [
        ("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.resnets.1.", "middle_block.2.", True),
    ]  # fmt: skip
    for i in range(levels):
        for j in range(layers):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", True))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.", False))
        for j in range(layers + 1):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", True))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", False))
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * i + 3}.0.op.", False))
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", False))
    return rules


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet keys -> ``diffusion_model`` keys (without the ``model.diffusion_model.`` prefix)."""
    rules = _unet_rules()
    out = {}
    for key, value in state.items():
        src, dst, is_resnet = next(r for r in rules if key.startswith(r[0]))
        rest = key[len(src) :]
        if is_resnet:
            rest = next((rest.replace(a, b, 1) for a, b in RESNET_RENAMES if rest.startswith(a + ".")), rest)
        out[dst + rest] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model`` keys (without that prefix)."""
    rules = []
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        rules.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    for i in range(levels):
        rules.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        rules.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    out = {}
    for key, value in state.items():
        src, dst = next((r for r in rules if key.startswith(r[0])), ("", ""))
        new = dst + key[len(src) :]
        if ".mid.attn_1." in new:
            for a, b in VAE_ATTN_RENAMES:
                new = new.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if value.ndim == 2:  # linear -> 1x1 conv, as the original VAE stores attention projections
                value = value[:, :, None, None]
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def to_original_checkpoint(unet_state: dict, vae_state: dict) -> dict[str, torch.Tensor]:
    """A full original-layout SD state dict (``model.diffusion_model.*`` + ``first_stage_model.*``)."""
    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet_state).items()}
    ckpt.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae_state).items()})
    return {k: v.contiguous() for k, v in ckpt.items()}


def vpd_backbone_to_authors(
    state: dict[str, torch.Tensor], root: str = "", class_set: str | None = None, embeddings_3d: bool = False
) -> dict[str, torch.Tensor]:
    """The backbone part of a ``VPDModel`` state dict in the key layout of the authors' VPD models,
    under ``root`` (``"encoder."`` in their depth model, ``""`` in their seg and refer models):
    ``unet.unet.diffusion_model.*``, ``encoder_vq.*``, ``text_adapter.fc.*``, ``gamma`` and, with
    ``class_set``, the ``class_embeddings`` buffer without our mean row (``[N, D]``, or ``[N, 1, D]``
    with ``embeddings_3d``)."""

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    out = {f"{root}unet.unet.diffusion_model.{k}": v for k, v in unet_to_ldm(part("backbone.unet.")).items()}
    out.update({f"{root}encoder_vq.{k}": v for k, v in vae_to_ldm(part("backbone.vae.")).items()})
    out.update({f"{root}text_adapter.fc.{k}": v for k, v in part("backbone.text_adapter.fc.").items()})
    out[f"{root}gamma"] = state["backbone.text_adapter.gamma"]
    if class_set is not None:
        classes = state[f"backbone.class_embeddings.{class_set}.weight"][:-1]
        out[f"{root}class_embeddings"] = classes[:, None] if embeddings_3d else classes
    return out
