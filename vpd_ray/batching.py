"""The batch policy: micro-batch, accumulation and learning rate for a given number of workers.

The reference recipes fix a global batch (NYU 24, ADE20K 16, RefCOCO 32) and a learning rate tuned
for it. A cluster run has whatever number of GPUs it got. The rule, the same on the driver (for
``--dry-run`` and validation) and on every worker (from its real world size):

1. Keep ``train.global_batch_size`` wherever it can be reached: pick the largest micro-batch ``m``
   no larger than the task's ``batch_size`` (a per-worker cap: it is what fits in memory) and an
   accumulation ``a`` with ``m x workers x a == global``. NYU's 24 is reached on 1, 2, 3, 4, 6, 8,
   12 and 24 workers (on 3: 2 x 3 x 4).
2. Otherwise take the reachable global batch nearest to it (ties: the larger micro-batch, then the
   fewer accumulation steps), and scale the learning rate by ``train.lr_scaling``:
   ``linear`` (lr x actual / configured, Goyal et al.), ``sqrt`` (x its square root), or ``none``.
   NYU on 16 workers: 32 = 2 x 16 x 1, lr 5e-4 -> 6.67e-4 under ``linear``.
3. Without ``train.global_batch_size``: no accumulation, each task's ``batch_size`` per worker.

Multitask runs have one accumulation count (DeepSpeed has one), chosen to fit all tasks best.
"""

from __future__ import annotations

import dataclasses
import math

LR_SCALINGS = ("none", "linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    workers: int
    micro: dict[str, int]  # task -> samples per worker per micro-batch
    accum: int  # micro-batches per optimizer step
    configured_global: int | None  # train.global_batch_size
    lr: float  # the base learning rate after scaling
    lr_factor: float  # lr / train.lr
    reason: str  # one line: what was chosen and why

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over all workers (the first task's, for a multitask run)."""
        return next(iter(self.micro.values())) * self.workers * self.accum


def _best_micro(cap: int, workers: int, accum: int, target: int) -> tuple[int, int]:
    """(distance to ``target``, micro-batch) of the best micro-batch <= ``cap`` at ``accum``."""
    return min((abs(m * workers * accum - target), -m) for m in range(1, cap + 1))


def plan_batches(caps: dict[str, int], workers: int, global_batch: int | None, lr: float,
                 lr_scaling: str = "linear") -> BatchPlan:
    """The batch plan of the module docstring; ``caps``: each task's ``batch_size``."""
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling {lr_scaling!r} is not one of {', '.join(LR_SCALINGS)}")
    if global_batch is None:
        per = ", ".join(f"{b} x {workers}" for b in caps.values())
        return BatchPlan(workers, dict(caps), 1, None, lr, 1.0,
                         f"train.global_batch_size unset: no accumulation, global batch {per}")
    best = None
    for accum in range(1, max(1, math.ceil(global_batch / workers)) + 1):
        picks = {name: _best_micro(cap, workers, accum, global_batch) for name, cap in caps.items()}
        score = (sum(d for d, _ in picks.values()), sum(m for _, m in picks.values()), accum)
        if best is None or score < best[0]:
            best = (score, accum, {name: -m for name, (_, m) in picks.items()})
    (distance, _, _), accum, micro = best
    first = next(iter(micro))
    actual = micro[first] * workers * accum
    shape = f"{actual} = {micro[first]} per worker x {workers} workers x {accum} accumulation"
    lowered = [f"tasks.{n}.batch_size {caps[n]} lowered to {m}" for n, m in micro.items() if m != caps[n]]
    note = f" ({'; '.join(lowered)})" if lowered else ""
    if distance == 0:
        return BatchPlan(workers, micro, accum, global_batch, lr, 1.0, f"global batch {shape}{note}")
    ratio = actual / global_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[lr_scaling]
    reason = (f"train.global_batch_size {global_batch} is not reachable on {workers} workers with micro-batch "
              f"<= {caps[first]}: nearest is {shape}{note}; lr {lr:.3g} -> {lr * factor:.3g} "
              f"(train.lr_scaling={lr_scaling})")
    return BatchPlan(workers, micro, accum, global_batch, lr * factor, factor, reason)
