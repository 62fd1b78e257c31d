"""Model packages: the output of training and the input of inference and evaluation.

A package is a directory with ``model.safetensors`` (every weight, the frozen VAE and the class
embeddings included, fp32), ``config.yaml`` (the resolved run config) and ``architecture.json``
(the diffusers configs of the UNet and VAE). Loading needs neither Ray nor DeepSpeed, nor the
Stable Diffusion weights the run started from: the model is rebuilt from the config and the
architecture, and the weights are loaded strictly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
ARCHITECTURE = "architecture.json"


def architecture(model: "Any") -> dict[str, Any]:
    """The diffusers configs that rebuild the backbone's UNet and VAE without their weight files."""
    backbone = model.backbone
    return {"unet": dict(backbone.unet.config), "vae": dict(backbone.vae.config)}


def build_model(cfg: DictConfig, arch: dict[str, Any] | None = None) -> "Any":
    """The ``VPDModel`` of a resolved config: backbone from ``model.backbone``, one head per task.

    With ``arch`` (:func:`architecture`), the UNet and VAE are built from their diffusers configs
    with fresh weights, for a caller that loads all weights afterwards.
    """
    from vpd_ray.model.backbone import BackboneConfig, VPDBackbone
    from vpd_ray.model.vpd import VPDModel
    from vpd_ray.tasks import get_task

    backbone_cfg = BackboneConfig(**OmegaConf.to_container(cfg.model.backbone, resolve=True))
    if arch is None:
        backbone = VPDBackbone.from_config(backbone_cfg)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet, vae = UNet2DConditionModel.from_config(arch["unet"]), AutoencoderKL.from_config(arch["vae"])
        backbone = VPDBackbone(unet, vae, attn_map_divisor=backbone_cfg.attn_map_divisor)
    tasks = {name: get_task(name)(_task_config(section, drop_files=arch is not None)) for name, section in cfg.tasks.items()}
    return VPDModel(backbone, tasks)


def _task_config(section: DictConfig, drop_files: bool) -> Any:
    """The task's config object; with ``drop_files``, options naming weight files (class embeddings)
    are cleared: they only initialise buffers that the caller's weights then overwrite, and the
    files need not exist where a package is loaded."""
    from vpd_ray.config import WEIGHT_SUFFIXES

    section = section.copy()
    if drop_files:
        for key, value in section.items():
            if isinstance(value, str) and value.endswith(WEIGHT_SUFFIXES):
                section[key] = None
    return OmegaConf.to_object(section)


def read_architecture(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, ARCHITECTURE)) as f:
        return json.load(f)


def write_architecture(directory: str, arch: dict[str, Any]) -> None:
    with open(os.path.join(directory, ARCHITECTURE), "w") as f:
        json.dump(arch, f, indent=1, default=list)


def load_config(path: str) -> DictConfig:
    from vpd_ray.config import compose

    return compose(path)


def export_package(state_dict: dict[str, torch.Tensor], config_yaml: str, arch: dict[str, Any], out_dir: str) -> str:
    """Write ``state_dict`` (fp32, contiguous) and the config; returns ``out_dir``.

    The weights are checked against a model built from the config first, so a package that
    ``load_package`` would reject is never written.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, CONFIG)
    with open(config_path, "w") as f:
        f.write(config_yaml)
    write_architecture(out_dir, arch)
    model = build_model(load_config(config_path), arch)
    load_strict(model, state_dict, source="the consolidated checkpoint")
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "vpd_ray"})
    return out_dir


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one readable error listing what is missing, unexpected or mis-shaped."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights from {source} do not fit the model: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} mis-shaped {shapes[:3]}"
        )
    model.load_state_dict(state_dict, strict=True)


def load_package(path: str) -> tuple["Any", DictConfig]:
    """``(VPDModel in eval mode, resolved config)`` from a package directory."""
    from safetensors.torch import load_file

    weights, config_path = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    for needed in (weights, config_path, os.path.join(path, ARCHITECTURE)):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{path!r} is not a model package: {os.path.basename(needed)} missing")
    cfg = load_config(config_path)
    model = build_model(cfg, read_architecture(path))
    load_strict(model, load_file(weights), source=weights)
    return model.eval(), cfg
