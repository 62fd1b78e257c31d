"""Distributed evaluation: each rank runs the task's test protocol on its part of a split, then
the metric sums are all-reduced once, so the result equals a single-process pass over the split.

Ranks may hold one batch more than others (the eval stream splits at sample level). Under ZeRO-3
every forward gathers parameters collectively, so all ranks must run the same number of forwards:
:func:`lockstep` agrees on "anyone still has a batch" each iteration and lets an exhausted rank
repeat its last batch without counting it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from vpd_ray.contracts import Batch
from vpd_ray.engine.collectives import FAILED, agree, distributed, raise_if_failed, rank
from vpd_ray.errors import InputError
from vpd_ray.tasks.base import Task


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors to ``device``; keys and other values unchanged."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def lockstep(
    batches: Iterable[Batch], device: torch.device, limit: int | None = None
) -> Iterator[tuple[Batch, bool]]:
    """``(batch, counts)`` until every rank is exhausted; ``counts`` is False for a padding repeat.

    The per-batch "anyone still has a batch" flag also carries an input error of any rank
    (corrupt data over the limit, a forbidden field), so every rank stops together with its message.
    """
    it, last, seen = iter(batches), None, 0
    while True:
        batch, error = None, None
        try:
            batch = next(it, None) if limit is None or seen < limit else None
        except InputError as err:
            error = err
        seen += batch is not None
        flag = FAILED + rank() if error is not None else int(batch is not None)
        status = agree(torch.tensor([flag], dtype=torch.int64, device=device))
        raise_if_failed(status, error)
        if not status:
            return
        if batch is None and last is None:
            raise RuntimeError(f"rank {dist.get_rank()} got no evaluation batch while other ranks did")
        if batch is not None:
            last = batch
        yield (batch if batch is not None else last), batch is not None


def all_reduce_sum(state: torch.Tensor) -> torch.Tensor:
    if distributed():
        state = state.clone()
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
    return state


def evaluate_task(
    task: Task,
    forward: Callable[[torch.Tensor, Batch], Any],
    batches: Iterable[Batch],
    device: torch.device,
    limit: int | None = None,
    on_batch: Callable[[Batch, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """The task's full test protocol over this rank's batches; metrics over all ranks, prefixed ``task/``.

    ``forward(images, batch)`` runs backbone + head (the caller decides engine, dtype and VAE);
    ``on_batch(batch, prediction)`` sees each scored batch (the trainer draws its pictures there).
    """
    metric, scored = task.metric(), 0
    for batch, counts in lockstep(batches, device, limit):
        batch = to_device(batch, device)
        pred = task.predict(forward, batch)
        if counts:
            metric.update(pred.float(), batch)
            if on_batch is not None:
                on_batch(batch, pred)
            scored += batch["image"].shape[0]
    state = metric.state()
    metric.load_state(all_reduce_sum(state.to(device)).cpu())
    samples = int(all_reduce_sum(torch.tensor([scored], dtype=torch.float64, device=device)).item())
    # "samples": how many were scored, so a metric over part of a split is never mistaken for the whole
    return {**{f"{task.name}/{k}": float(v) for k, v in metric.compute().items()}, f"{task.name}/samples": samples}


def report_metrics(metrics: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
    """``ray.train.report`` that reaches ``Result.metrics``: Ray Train v2 keeps only metrics that come
    with a checkpoint, so rank 0 attaches a small one holding ``metrics.json`` and ``files``
    (``{relative path: bytes}``: what else the driver needs, e.g. the evaluation report's scores)."""
    import json
    import os
    import tempfile

    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="vpd_metrics_") as directory:
        with open(os.path.join(directory, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        for path, data in (files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(directory, path)), exist_ok=True)
            with open(os.path.join(directory, path), "wb") as f:
                f.write(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
