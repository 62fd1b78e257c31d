"""The training step does not stall the host: at most one host sync per steady-state micro-step, the
all-reduced finite-loss flag. Losses are read only at ``train.log_every``.

Counted on CPU by patching what makes the host wait for a device value (``item``, ``tolist``,
``__bool__``, ``__int__``, ``__float__``, ``numpy``, indexing by a boolean mask) and keeping the calls
made from ``vpd_ray/``. Library internals are not counted: torch's AdamW reads its step counter with
``item()``, but that counter lives on the host, also on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import pytest
import torch

from vpd_ray.engine.optim import param_groups
from vpd_ray.engine.step import Stepper, TorchEngine
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.modeling import VPDModel
from vpd_ray.tasks.depth import DepthConfig, DepthTask
from vpd_ray.tasks.seg import SegConfig, SegTask

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vpd_ray") + os.sep
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


@contextlib.contextmanager
def count_syncs():
    """Counter of ``vpd_ray/file:line`` -> host reads of tensor values made there."""
    counts: Counter = Counter()

    def ours() -> str | None:
        frame = sys._getframe(2)
        path = frame.f_code.co_filename
        return f"{os.path.relpath(path, PACKAGE)}:{frame.f_lineno}" if path.startswith(PACKAGE) else None

    def wrap(original):
        def counted(self, *args, **kwargs):
            where = ours()
            if where:
                counts[where] += 1
            return original(self, *args, **kwargs)
        return counted

    def getitem(original):
        def counted(self, index):
            where = ours()
            masks = index if isinstance(index, tuple) else (index,)
            if where and any(torch.is_tensor(i) and i.dtype == torch.bool for i in masks):
                counts[where] += 1
            return original(self, index)
        return counted

    saved = {name: getattr(torch.Tensor, name) for name in (*SYNCING, "__getitem__")}
    try:
        for name in SYNCING:
            setattr(torch.Tensor, name, wrap(saved[name]))
        torch.Tensor.__getitem__ = getitem(saved["__getitem__"])
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _batches(count: int):
    gen = torch.Generator().manual_seed(0)
    depth = [{"image": torch.rand(2, 3, 64, 64, generator=gen), "depth": torch.rand(2, 1, 64, 64, generator=gen) * 5,
              "class_id": torch.tensor([3, -1])} for _ in range(count)]
    seg = [{"image": torch.rand(2, 3, 64, 64, generator=gen), "label": torch.randint(0, 6, (2, 64, 64), generator=gen)}
           for _ in range(count)]
    return {"depth": iter(depth), "seg": iter(seg)}


@pytest.mark.parametrize("accum", [1, 2])
def test_at_most_one_host_sync_per_steady_state_micro_step(tiny_backbone_config, accum):
    tasks = {"depth": DepthTask(DepthConfig(head_dim=16)),
             "seg": SegTask(SegConfig(num_classes=6, class_set="synth_seg", crop_size=[64, 64], scale=[128, 64],
                                      neck_channels=16, head_channels=8))}
    model = VPDModel(VPDBackbone.from_config(tiny_backbone_config), tasks).train()
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-4, 0.01, 0.1))  # the trainer's groups
    stepper = Stepper(TorchEngine(model, optimizer, accum=accum, grad_clip=1.0), model.tasks, model.backbone.encode,
                      optimizer=optimizer, lr_at=lambda step: 1.0)
    steps = 3
    iters = _batches((steps + 1) * accum)
    stepper.step(0, iters)  # warm-up: first-call work (lazy buffers, optimizer state) is not steady state
    with count_syncs() as counts:
        losses = [stepper.step(step, iters) for step in range(1, steps + 1)]
    assert all(torch.is_tensor(loss) and loss.ndim == 0 for loss in losses)  # read by the caller, when it logs
    assert sum(counts.values()) <= steps * accum, dict(counts)
    assert set(counts) <= {f"engine{os.sep}collectives.py:38"}, dict(counts)  # the flag's int(flag.item())
