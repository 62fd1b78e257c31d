"""Exponential moving average of the trainable weights (``train.ema_decay``, ``train.ema_eval``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weight``, in fp32, for every
parameter that requires grad: the frozen VAE (detached from the engine's module, and frozen) and
the class-embedding buffers are not in it, and BatchNorm running statistics stay the raw model's
(they are an average already). ``ema_decay: 0`` (the default, VPD's) builds no EMA at all
(:func:`build` returns None), so the training step is the one without it.

What is averaged is the module's own parameters, the weights the forward pass uses (bf16 copies of
the fp32 masters under ``deepspeed.bf16``): ZeRO-1/2 replicate them on every rank, while each rank
holds only its partition of the masters, so every rank keeps the same full fp32 EMA on the
parameter's device with no collective. The average itself is fp32, so it stays within one bf16
rounding of the average of the masters. ZeRO-3 partitions the parameters themselves: the config
refuses ``ema_decay > 0`` with ``zero_stage 3`` (:func:`vpd_ray.config.validate`).

The EMA is a plain full-size state keyed by parameter name (the model's state-dict names), saved
as ``ema.safetensors`` in every full checkpoint, so a resume on any worker count restores it as it
was and the resumed run's EMA is the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer trains, by name: frozen ones (the VAE) are no part of the EMA."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EMA:
    """An fp32 EMA of ``params`` (name -> parameter), on each parameter's device, starting at their values."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r} must be in (0, 1)")
        self.decay, self.params = decay, dict(params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """``ema = decay * ema + (1 - decay) * weight`` for every parameter, after an optimizer step.

        Two fused kernels over all tensors, the bf16 weights read as they are (no fp32 copy of the model)."""
        shadow = list(self.shadow.values())
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, [p.detach() for p in self.params.values()], alpha=1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights (a resume from a checkpoint saved without an EMA)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copies, for a checkpoint's ``ema.safetensors``."""
        return {name: t.detach().cpu().clone() for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Strict: the same names and shapes, else one readable error (a checkpoint of another model)."""
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in self.shadow.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"EMA weights from {source} do not fit the model: {len(missing)} missing {missing[:3]}, "
                             f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} mis-shaped {shapes[:3]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model (cast to each parameter's dtype) inside the block, the raw
        weights back bit for bit after it: validation under ``train.ema_eval`` scores the average while
        training goes on from the raw weights. Costs one copy of the weights, in their dtype, on their device."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params.values()]
            for name, p in self.params.items():
                p.detach().copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params.values(), raw):
                    p.detach().copy_(value)


def build(module: torch.nn.Module, decay: float) -> EMA | None:
    """The EMA of ``module``'s trainable parameters, or None for ``decay`` 0 (off: nothing kept, nothing done)."""
    return EMA(trainable(module), decay) if decay > 0 else None


def evaluating(ema: EMA | None, use: bool) -> contextlib.AbstractContextManager:
    """The weights validation scores: the EMA's when ``use`` (``train.ema_eval``), else the raw ones."""
    return ema.swapped() if ema is not None and use else contextlib.nullcontext()


def uses_ema(config_yaml: str) -> bool:
    """Whether a run's resolved config (a checkpoint's ``config.yaml``) exports the EMA weights."""
    from omegaconf import OmegaConf

    train = OmegaConf.create(config_yaml).get("train") or {}
    return bool(train.get("ema_eval", False)) and float(train.get("ema_decay", 0.0)) > 0
