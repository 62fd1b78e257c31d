"""Param groups, the learning-rate schedules of VPD.md and the DeepSpeed config dict.

The schedules are pure functions of the step, so a resumed run recomputes its learning rate from
the step stored in the checkpoint instead of restoring scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-d parameters (norm scales, the text adapter's gamma) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def _is_unet(name: str) -> bool:
    return ".unet." in f".{name}"


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    unet_lr_mult: float,
) -> list[dict[str, Any]]:
    """AdamW groups: {UNet, rest} x {decay, no decay}; frozen parameters are left out.

    Each group carries ``base_lr`` (``lr`` times the UNet multiplier where it applies), which the
    schedule factor scales every step. Empty groups are dropped (DeepSpeed rejects them).

    A parameter that carries its own multiplier, ``param.lr_mult`` (the learned prompt tokens of
    ``context: learned``, ``tasks.<name>.prompt_lr_mult``: :class:`vpd_ray.model.text.PromptTokens`),
    goes to a group of its own at ``lr * lr_mult`` (``lr_x<mult>``, decay or not by the same rule),
    after the four above: a model without such parameters gets exactly the groups it always got.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    own: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        mult = getattr(param, "lr_mult", None)
        if mult is not None:
            own.setdefault((float(mult), _is_no_decay(name, param)), []).append(param)
            continue
        key = (_is_unet(name), _is_no_decay(name, param))
        buckets.setdefault(key, []).append(param)
    groups = []
    for (unet, no_decay), params in sorted(buckets.items()):
        base_lr = lr * (unet_lr_mult if unet else 1.0)
        groups.append(
            {
                "params": params,
                "lr": base_lr,
                "base_lr": base_lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "group_name": f"{'unet' if unet else 'other'}{'_no_decay' if no_decay else ''}",
            }
        )
    for (mult, no_decay), params in sorted(own.items()):
        groups.append({"params": params, "lr": lr * mult, "base_lr": lr * mult,
                       "weight_decay": 0.0 if no_decay else weight_decay,
                       "group_name": f"lr_x{mult:g}{'_no_decay' if no_decay else ''}"})
    return groups


def lr_factor(step: int, max_steps: int, schedule: Any, lr: float) -> float:
    """Multiplier of each group's ``base_lr`` at optimizer step ``step`` (0-based).

    ``schedule`` is ``train.schedule`` (kind, power, min_lr, peak_fraction, warmup_steps, warmup_ratio).
    """
    kind = schedule.kind
    floor = schedule.min_lr / lr if lr > 0 else 0.0
    if kind == "constant":
        return 1.0
    if kind == "poly_rise_fall":
        # VPD depth: min_lr -> lr as t**power over the first peak_fraction of training, then back.
        # (The reference falls as max - (max - min) * u**power, u going 0 -> 1 over the second half.)
        peak = max(1.0, schedule.peak_fraction * max_steps)
        if step <= peak:
            return floor + (1.0 - floor) * (step / peak) ** schedule.power
        fall = min(1.0, (step - peak) / max(1.0, max_steps - peak))
        return floor + (1.0 - floor) * (1.0 - fall**schedule.power)
    if kind == "warmup_poly":
        # VPD segmentation: linear warm-up from warmup_ratio, then (1 - t)**power down to min_lr.
        decay = floor + (1.0 - floor) * (1.0 - min(step, max_steps) / max_steps) ** schedule.power
        if step < schedule.warmup_steps:
            k = step / schedule.warmup_steps
            return decay * (schedule.warmup_ratio + (1.0 - schedule.warmup_ratio) * k)
        return decay
    raise ValueError(f"train.schedule.kind: unknown schedule {kind!r}")


def set_lr(optimizer: Any, factor: float) -> None:
    """Scale every group's ``base_lr`` by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def deepspeed_config(cfg: Any, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg.deepspeed`` / ``cfg.train``.

    The optimizer is ours (torch AdamW with per-group LRs), hence ``zero_allow_untested_optimizer``;
    the schedule is applied by :func:`set_lr`, so DeepSpeed gets none.
    """
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(cfg.train.grad_clip),
        "bf16": {"enabled": bool(cfg.deepspeed.bf16)},
        "zero_optimization": {"stage": int(cfg.deepspeed.zero_stage), **zero_comm(cfg.deepspeed)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress log replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.bf16:
        # Parameters only: buffers stay fp32 (DeepSpeed >= 0.19's default, pinned here), since bf16
        # BatchNorm running statistics would lose every update below ~0.3% of their value. Their users
        # cast at the point of use: FP32BatchNorm2d normalises in fp32, and the backbone casts the text
        # context (class-embedding rows) to its own dtype.
        ds["data_types"] = {"buffer_dtype": "fp32"}
    if cfg.deepspeed.grad_accum_dtype is not None:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = cfg.deepspeed.grad_accum_dtype
    if cfg.deepspeed.zero_stage == 3:
        # Gather a layer's shards right before use and keep nothing resident: the UNet is the bulk.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
    if math.isclose(cfg.train.grad_clip, 0.0):
        ds.pop("gradient_clipping")
    return ds


def zero_comm(section: Any) -> dict[str, Any]:
    """ZeRO's gradient-communication options of ``deepspeed.*`` (DeepSpeed's names; ZeRO-3 has no
    all-gather bucket: it prefetches by ``stage3_prefetch_bucket_size``)."""
    comm = {"overlap_comm": bool(section.overlap_comm), "contiguous_gradients": bool(section.contiguous_gradients),
            "reduce_bucket_size": int(section.reduce_bucket_size)}
    if section.zero_stage in (1, 2):
        comm["allgather_bucket_size"] = int(section.allgather_bucket_size)
    return comm
