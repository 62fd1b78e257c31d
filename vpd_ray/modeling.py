"""The assembled model: ``VPDModel`` (one shared backbone, one head per task; every task-specific
step is the task's) and building it from a resolved config.

It sits above ``tasks/`` and ``model/`` (it combines them), so neither imports the other's
assembly: see the layers in docs/architecture.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from omegaconf import DictConfig, OmegaConf

from vpd_ray.contracts import Batch
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.tasks.base import Task


class VPDModel(nn.Module):
    """``forward(task_name, batch)`` = task context -> backbone -> head; ``predict`` = the task's protocol.

    Heads live in ``self.heads`` (an ``nn.ModuleDict`` keyed by task name); the tasks themselves are
    plain objects (no parameters). ``task.context`` receives the backbone, whose ``class_embeddings``
    the task registered in ``build_head``.
    """

    def __init__(self, backbone: VPDBackbone, tasks: Mapping[str, Task]):
        super().__init__()
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.heads = nn.ModuleDict({name: task.build_head(backbone) for name, task in self.tasks.items()})

    def forward(self, task_name: str, batch: Batch, latents: torch.Tensor | None = None) -> Any:
        """Training forward on ``batch["image"]``; pass ``latents`` (``backbone.encode``) to skip the VAE here."""
        return self.forward_images(task_name, batch["image"], batch, latents)

    def forward_images(
        self, task_name: str, images: torch.Tensor, batch: Batch, latents: torch.Tensor | None = None
    ) -> Any:
        """Backbone + head of ``task_name`` on ``images`` (``batch`` supplies the task's context inputs)."""
        task = self._task(task_name)
        if latents is None:
            latents = self.backbone.encode(images)
        context = task.context(self.backbone, batch)
        feats = self.backbone.forward_features(latents, context, with_attention_maps=task.uses_attention_maps)
        return self.heads[task_name](feats, tuple(images.shape[-2:]))

    @torch.no_grad()
    def predict(self, task_name: str, batch: Batch) -> torch.Tensor:
        """The task's test-time protocol (e.g. depth: sliding windows + flip)."""
        return self._task(task_name).predict(partial(self.forward_images, task_name), batch)

    def _task(self, name: str) -> Task:
        if name not in self.tasks:
            raise KeyError(f"task {name!r} is not in this model; it has: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]


def architecture(model: "VPDModel") -> dict[str, Any]:
    """The diffusers configs that rebuild the backbone's UNet and VAE without their weight files."""
    backbone = model.backbone
    return {"unet": dict(backbone.unet.config), "vae": dict(backbone.vae.config)}


def build_model(cfg: DictConfig, arch: dict[str, Any] | None = None) -> "VPDModel":
    """The ``VPDModel`` of a resolved config: backbone from ``model.backbone``, one head per task.

    With ``arch`` (:func:`architecture`), the UNet and VAE are built from their diffusers configs
    with fresh weights, for a caller that loads all weights afterwards.
    """
    from vpd_ray.model.backbone import BackboneConfig
    from vpd_ray.tasks import get_task

    backbone_cfg = BackboneConfig(**OmegaConf.to_container(cfg.model.backbone, resolve=True))
    if arch is None:
        backbone = VPDBackbone.from_config(backbone_cfg)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet, vae = UNet2DConditionModel.from_config(arch["unet"]), AutoencoderKL.from_config(arch["vae"])
        backbone = VPDBackbone(unet, vae, **backbone_cfg.options())
    tasks = {name: get_task(name)(_task_config(name, section, drop_files=arch is not None))
             for name, section in cfg.tasks.items()}
    return VPDModel(backbone, tasks)


def _task_config(name: str, section: DictConfig, drop_files: bool) -> Any:
    """The task's config object (:func:`vpd_ray.config.task_config`, as validation made it); with
    ``drop_files``, options naming weight files (class embeddings) are cleared: they only initialise
    buffers that the caller's weights then overwrite, and the files need not exist where a package
    is loaded."""
    from vpd_ray.config import task_config
    from vpd_ray.paths import WEIGHT_SUFFIXES

    section = section.copy()
    if drop_files:
        for key, value in section.items():
            if isinstance(value, str) and value.endswith(WEIGHT_SUFFIXES):
                section[key] = None
    return task_config(name, section)
