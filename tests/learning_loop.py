"""Test helper: short single-process training and evaluation on the synthetic sample shards.

The real model and data path (``VPDModel``, ``build_stream`` over ``shards/sample``, each task's
transforms, loss, test protocol and metric via ``evaluate_task``, the trainer's ``param_groups``),
without Ray and DeepSpeed, whose start-up would cost more than the learning itself on a 2-core CI
machine; the Ray Train path has its own end-to-end tests (``tests/test_train.py``).

Each step is the product's own (:class:`vpd_ray.engine.step.Stepper`) over a plain-torch engine: a
multitask step accumulates one micro-batch per task on average, each drawn by ``batch_share``, as in the
trainer. Runs on one intra-op thread: for the tiny model a second thread costs 3x the CPU time and
is slower on a shared 2-core machine.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any

import torch

SAMPLE = Path(__file__).resolve().parent.parent / "shards" / "sample"


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample_urls(kind: str, split: str) -> str:
    return str(SAMPLE / f"{kind}-{split}-000000.tar") if split == "val" else str(SAMPLE / f"{kind}-train-{{000000..000001}}.tar")


def build(tasks: dict[str, Any], seed: int = 0, **backbone: Any):
    """A ``VPDModel`` on the tiny backbone with ``tasks`` (name -> Task); ``backbone``: more
    ``BackboneConfig`` fields (e.g. ``latent_scale``)."""
    from vpd_ray.model.backbone import BackboneConfig, VPDBackbone
    from vpd_ray.modeling import VPDModel

    torch.manual_seed(seed)
    return VPDModel(VPDBackbone.from_config(BackboneConfig(source="tiny", seed=seed, **backbone)), tasks)


def train(model, steps: int, lr: float, batch_size: int = 4, unet_lr_mult: float = 0.1, seed: int = 0,
          grad_clip: float | None = None, jpeg_decode: str = "loader") -> list[float]:
    """``steps`` AdamW optimizer steps of the product's stepper; returns the mean loss per step.

    A step accumulates one micro-batch per task of ``model`` (so a two-task model sees, on average,
    one batch of each per step). ``grad_clip``: clip the global gradient norm, as ``train.grad_clip``;
    ``jpeg_decode``: as ``data.jpeg_decode``.
    """
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.engine.optim import param_groups
    from vpd_ray.engine.step import Stepper, TorchEngine

    # One loader process per task: decode and augmentation on the other core, beside the training
    # thread. One slot either way (num_workers 0 or 1), so the same samples and draws as in-process.
    iters = {
        name: iter(build_stream(sample_urls(name, "train"), task.train_transform, train=True, batch_size=batch_size,
                                seed=seed, fields=task.fields, num_workers=1, shuffle_buffer=64,
                                jpeg_decode=jpeg_decode))
        for name, task in model.tasks.items()
    }  # fmt: skip
    # foreach: the same updates bit for bit as the per-tensor loop torch picks on CPU, ~15% less step time
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), lr, 0.01, unet_lr_mult), foreach=True)
    accum = len(model.tasks)
    stepper = Stepper(TorchEngine(model, optimizer, accum=accum, grad_clip=grad_clip or 0.0), model.tasks,
                      model.backbone.encode, accum=accum, seed=seed)
    model.train()
    with one_thread():
        return [float(stepper.step(step, iters)) for step in range(steps)]


@torch.no_grad()
def evaluate(model, name: str, max_batches: int = 4, batch_size: int = 8, predict=None) -> dict[str, float]:
    """The task's test protocol + metric on the first ``max_batches`` validation batches (unprefixed keys).

    ``predict(batch)`` replaces the model's prediction (for baselines).
    """
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.engine.evaluation import evaluate_task

    task = model.tasks[name]
    model.eval()
    stream = build_stream(sample_urls(name, "val"), task.eval_transform, train=False, batch_size=batch_size,
                          fields=task.fields, num_workers=0)  # fmt: skip
    if predict is None:
        with one_thread():
            metrics = evaluate_task(task, partial(model.forward_images, name), stream, torch.device("cpu"), max_batches)
    else:
        metric = task.metric()
        for i, batch in enumerate(stream):
            if i >= max_batches:
                break
            metric.update(predict(batch), batch)
        metrics = {f"{name}/{k}": v for k, v in metric.compute().items()}
    return {k.split("/", 1)[1]: v for k, v in metrics.items()}
