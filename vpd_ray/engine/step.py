"""One training step, the same everywhere: the product's trainer, the learning tests and the benchmark.

An optimizer step is ``accum`` micro-batches. Each micro-batch comes from one task, drawn by the
tasks' ``batch_share`` from an rng seeded by the run seed, the step and the micro-batch index, so every
rank draws the same task (their collectives stay in step) and a resumed run draws what the
uninterrupted one would have. The loss is the task's loss times its ``loss_weight``, in fp32. A
non-finite loss on any rank skips that micro-batch on every rank or stops the run, by
``train.nan_policy``; an input error on any rank (:class:`~vpd_ray.errors.InputError`) stops every
rank with its message. Both ride on one all-reduced flag per micro-batch
(:mod:`vpd_ray.engine.collectives`).

The stepper drives anything engine-like (:class:`Engine`): DeepSpeed's engine in the product
(``engine.backward`` scales by the accumulation, ``engine.step`` steps the optimizer at the
boundary), or :class:`TorchEngine`, the same contract over a plain module and torch optimizer.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from vpd_ray.engine.collectives import NONFINITE, agree, flag_of, raise_if_failed
from vpd_ray.engine.evaluation import to_device
from vpd_ray.engine.optim import set_lr
from vpd_ray.errors import InputError, NonFiniteLossError

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the stepper needs: DeepSpeed's ``DeepSpeedEngine`` has exactly this."""

    def __call__(self, task_name: str, batch: dict[str, Any], latents: torch.Tensor) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...


class TorchEngine:
    """:class:`Engine` over a plain module and a torch optimizer (fp32, one process): the loss is
    scaled by ``1 / accum`` like DeepSpeed's, and the optimizer steps (after clipping the global
    gradient norm to ``grad_clip``, like ``train.grad_clip``) every ``accum`` micro-batches."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, accum: int = 1,
                 grad_clip: float = 0.0):
        self.module, self.optimizer, self.accum, self.grad_clip = module, optimizer, accum, grad_clip
        self._micro = 0

    def __call__(self, task_name: str, batch: dict[str, Any], latents: torch.Tensor) -> Any:
        return self.module(task_name, batch, latents=latents)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def float_outputs(outputs: Any) -> Any:
    """Losses are computed in fp32 even when the engine runs in bf16."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float_outputs(v) for v in outputs)
    return outputs


def check_nan_policy(skips: int, policy: str, max_skips: int, step: int, task_name: str) -> None:
    """After the ``skips``-th non-finite loss: return to skip the batch, or stop naming the step."""
    if policy == "stop" or skips > max_skips:
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (task {task_name}); nan_policy={policy}, "
            f"{skips} batch(es) skipped so far, max_nan_skips={max_skips}"
        )


class Stepper:
    """Optimizer steps over ``engine`` for the tasks of a ``VPDModel``.

    ``encode(images) -> latents`` runs the frozen VAE (the product: fp32, outside the engine);
    ``optimizer`` holds the param groups whose ``base_lr`` ``lr_at(step)`` scales each step
    (None: leave the LRs alone); ``ema`` (:class:`vpd_ray.engine.ema.EMA`, None when
    ``train.ema_decay`` is 0) is updated after every optimizer step.
    """

    def __init__(self, engine: Engine, tasks: dict[str, Any], encode: Callable[[torch.Tensor], torch.Tensor], *,
                 accum: int = 1, seed: int = 0, device: torch.device | None = None, optimizer: Any = None,
                 lr_at: Callable[[int], float] | None = None, nan_policy: str = "skip", max_nan_skips: int = 10,
                 ema: Any = None):
        self.engine, self.tasks, self.encode = engine, tasks, encode
        self.accum, self.seed, self.device = accum, seed, device or torch.device("cpu")
        self.optimizer, self.lr_at = optimizer, lr_at
        self.nan_policy, self.max_nan_skips = nan_policy, max_nan_skips
        self.nan_skips = 0  # over the run; checkpointed by the trainer
        self.ema = ema

    def task_for(self, step: int, micro: int) -> str:
        """Task of a micro-batch, drawn by ``batch_share``; the same on every rank and after a resume."""
        names = list(self.tasks)
        if len(names) == 1:
            return names[0]
        weights = [self.tasks[n].cfg.batch_share for n in names]
        return random.Random(self.seed * 1_000_003 + step * 97 + micro).choices(names, weights)[0]

    def loss(self, task_name: str, batch: dict[str, Any]) -> torch.Tensor:
        task = self.tasks[task_name]
        batch = task.augment_on_device(batch)
        outputs = self.engine(task_name, batch, latents=self.encode(batch["image"]))
        return task.loss(float_outputs(outputs), batch) * task.cfg.loss_weight

    def _skip(self, loss: torch.Tensor | None, error: InputError | None, step: int, task_name: str) -> bool:
        """One all-reduced flag for every rank: an input error on any rank stops them all (its message);
        a non-finite loss on any rank skips the micro-batch everywhere, or stops the run by policy."""
        status = agree(flag_of(error, loss, self.device))
        raise_if_failed(status, error)
        if status != NONFINITE:
            return False
        self.nan_skips += 1
        check_nan_policy(self.nan_skips, self.nan_policy, self.max_nan_skips, step, task_name)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning(f"[vpd] step {step}: non-finite loss (task {task_name}), batch skipped ({self.nan_skips})")
        return True

    def step(self, step: int, iters: dict[str, Iterator[dict[str, Any]]]) -> torch.Tensor:
        """Optimizer step ``step`` (0-based) = ``accum`` finite micro-batches; returns their mean loss
        as a 0-d device tensor: reading it is the caller's choice (the trainer's, at ``log_every``),
        so the host never waits for the optimizer here. The one host sync of a micro-batch is the
        all-reduced flag of :meth:`_skip`."""
        if self.lr_at is not None:
            set_lr(self.optimizer, self.lr_at(step))
        total, micro = torch.zeros((), device=self.device), 0
        while micro < self.accum:
            task_name = self.task_for(step, micro)
            loss, error = None, None
            try:
                loss = self.loss(task_name, to_device(next(iters[task_name]), self.device))
            except InputError as err:  # corrupt data over the limit, a forbidden field: every rank stops
                error = err
            if self._skip(loss, error, step, task_name):
                continue
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
            micro += 1
        if self.ema is not None:  # the accum-th engine.step above stepped the optimizer
            self.ema.update()
        return total / self.accum
