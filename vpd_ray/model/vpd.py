"""``VPDModel``: one shared backbone and one head per task; every task-specific step is the task's."""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.tasks.base import Batch, Task


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
