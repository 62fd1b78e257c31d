"""The contract every task implements.

Data flows one way and a task plugs in at both ends::

    shard sample --decode--> dict --task.train_transform/eval_transform--> fixed-shape tensors
      --collate--> batch --to device (--task.augment_on_device, train)
      --task.context + backbone + head--> outputs --task.loss--> scalar
                                                  \\--task.predict (test-time protocol)--> prediction
                                                        --task.metric().update--> summed state

The trainer never looks inside a batch: it moves tensors to the device, asks the task for the
loss, and all-reduces metric states, which are plain 1-d tensors of sums so that distributed
accumulation equals single-process accumulation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from vpd_ray.contracts import Batch, Metric, Sample

if TYPE_CHECKING:
    from vpd_ray.visualize import Panel


@dataclasses.dataclass
class TaskConfig:
    """Options every task has. Task-specific options live in a subclass (``Task.config_class``).

    Field names are permanent config keys (``tasks.<name>.<field>`` in YAML). A renamed key stays
    readable: ``renamed`` maps old names to new ones, and :meth:`upgrade` rewrites an old section
    (runs and packages keep their resolved configs) with a one-line notice per key.
    """

    renamed: ClassVar[dict[str, str]] = {"ratio": "batch_share"}

    train_shards: str | None = None  # brace pattern or comma list of shard URLs
    val_shards: str | None = None
    test_shards: str | None = None
    loss_weight: float = 1.0  # multitask: weight of this task's loss
    batch_share: float = 1.0  # multitask: relative share of micro-batches drawn from this task
    batch_size: int = 2  # micro-batch per worker (a cap: see vpd_ray.batching)
    eval_batch_size: int = 1

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> list[str]:
        """Rewrite old keys of ``raw`` (one task section, a plain dict) in place; returns the notices."""
        notices = []
        for old, new in cls.renamed.items():
            if old in raw:
                if new not in raw:
                    raw[new] = raw[old]
                del raw[old]
                notices.append(f"{old} is deprecated: renamed to {new}")
        return notices


def check_hw(key: str, value: Any) -> None:
    """A ``[height, width]`` option (crops, windows): two positive integers."""
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{key} must be [height, width] > 0, got {list(value)}")


class Task:
    """Base class of a registered task (see ``vpd_ray.tasks.register_task``)."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    # The metric that selects the best checkpoint / Tune trial, and whether lower is better.
    primary_metric: ClassVar[str]
    metric_mode: ClassVar[str]  # "min" or "max"
    # Shard fields this task decodes (a whitelist: anything else in a shard is an error).
    fields: ClassVar[tuple[str, ...]]
    # The paper's table columns for this task, (metric key, column label): `python -m vpd_ray.evaluate` prints them.
    paper_row: ClassVar[tuple[tuple[str, str], ...]]
    # What a prediction is, so inference picks the writer: "depth" (metres), "labels" (class ids), "mask" (0/1).
    output_kind: ClassVar[str]
    # What ``inference_batch`` needs of a user besides the image (refer: "sentence").
    inference_inputs: ClassVar[tuple[str, ...]] = ()
    # Whether ``train_transform`` takes an image the loader left encoded (``data.jpeg_decode: device``:
    # it draws the geometry from the image's size and ``augment_on_device`` decodes and applies it).
    decodes_jpeg_on_device: ClassVar[bool] = False

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    # --- model side -------------------------------------------------------------------------
    @property
    def uses_attention_maps(self) -> bool:
        """Whether the backbone concatenates cross-attention maps onto f2/f3 for this task."""
        return False

    def context_tokens(self) -> int:
        """T, the number of cross-attention context tokens this task feeds the backbone."""
        raise NotImplementedError

    def build_head(self, backbone: nn.Module) -> nn.Module:
        """The head, sized from ``backbone.feature_info(...)``. May register class embeddings."""
        raise NotImplementedError

    def context(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Raw text context ``[B, T, D]`` (before the backbone's text adapter)."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, forward: Callable[[torch.Tensor, Batch], Any], batch: Batch) -> torch.Tensor:
        """The test-time protocol. ``forward(images, batch)`` runs backbone + head on images."""
        raise NotImplementedError

    def metric(self) -> Metric:
        raise NotImplementedError

    # --- data side --------------------------------------------------------------------------
    def train_transform(self, sample: Sample, rng: "Any") -> dict[str, Any]:
        """Augment one decoded sample into fixed-shape tensors (``rng``: numpy Generator)."""
        raise NotImplementedError

    def eval_transform(self, sample: Sample) -> dict[str, Any]:
        raise NotImplementedError

    def augment_on_device(self, batch: Batch) -> Batch:
        """The rest of ``train_transform``, on a collated train batch after the host-to-device copy: the
        image-only steps (photometric augmentation) as batched ops, with the per-sample parameters the
        transform drew on the CPU, and the uint8 image made float ``[B,3,H,W]`` in [0,1] for the backbone.

        Why here: those steps cost most of a sample's CPU time and are cheap on an accelerator, and
        drawing their parameters in the transform keeps seeding and resume exact. Must not read device
        values on the host (the training step's one sync is its loss flag). Default: nothing to do.
        """
        return batch

    # --- inference side -------------------------------------------------------------------------
    def inference_batch(self, pixels: torch.Tensor, inputs: list[dict[str, Any]], protocol: bool) -> Batch:
        """The batch for unlabelled images ``pixels`` ``[B,3,H,W]`` in [0,1] (photos, shards, a demo).

        ``inputs``: per image, ``{"meta": dict (a shard's json, or {}), "sentence": str or None}``;
        ``protocol``: the batch feeds :meth:`predict` (the test-time protocol) rather than a forward.
        A missing input the task needs is a ValueError naming it.
        """
        raise NotImplementedError

    # --- pictures -------------------------------------------------------------------------------
    def panels(self, image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None,
               sentence: str | None = None, fixed_scale: bool = False) -> list[Panel]:
        """The picture of one prediction, panel by panel (:mod:`vpd_ray.visualize`): the image, the
        ground truth when there is one, the prediction, and what compares them. ``image`` HxWx3 uint8,
        the maps HxW at its size (as ``to_map`` returns them); ``fixed_scale``: the model's whole
        output range instead of this sample's. TensorBoard, inference previews and the demo draw this."""
        raise NotImplementedError

    def example(self, batch: Batch, prediction: torch.Tensor, index: int) -> list[Panel]:
        """:meth:`panels` of sample ``index`` of an evaluation batch and its :meth:`predict` output."""
        raise NotImplementedError

    # --- report ---------------------------------------------------------------------------------
    # The evaluation report (`python -m vpd_ray.evaluate --report`) ranks samples by :meth:`scores`,
    # which point the way of ``primary_metric``: lower is better where ``metric_mode`` is "min".
    score_label: ClassVar[str]  # what a score measures, with its unit: the histogram's axis
    score_item: ClassVar[str] = "image"  # what one score is of (refer: "sentence")
    score_groups: ClassVar[str | None] = None  # what the groups of :meth:`scores` are (depth: "scene")

    def scores(self, prediction: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, list[str] | None]:
        """Per-sample scores of an evaluation batch and its :meth:`predict` output, from the task's
        metric functions: ``(values, groups)``. ``values`` float64 ``[B, N]``: N scores per sample
        (one per item; NaN where a slot holds no item or nothing could be scored); ``groups``: each
        sample's group name where ``score_groups`` names what they are, else None."""
        raise NotImplementedError


def image_of(batch: Batch, index: int) -> np.ndarray:
    """Sample ``index`` of a batch's ``image`` ``[B,3,H,W]`` in [0,1] as HxWx3 uint8."""
    pixels = batch["image"][index].detach().float().clamp(0, 1).mul(255).round().byte()
    return pixels.permute(1, 2, 0).cpu().numpy()
