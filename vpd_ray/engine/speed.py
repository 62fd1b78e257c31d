"""The speed options of a training worker (``train.tf32``, ``train.cudnn_benchmark``,
``train.channels_last``, ``train.compile``, ``model.vae_dtype``) and the ``--dtype`` of inference and
evaluation, applied in one place so the trainer, ``infer``, ``evaluate`` and ``python -m vpd_ray.bench
gpu`` run the same code. Each is a plain PyTorch switch; none changes
what is computed beyond the stated tolerance (tests/test_speed.py), and each can be turned off.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure_backends(train: Any, device: torch.device) -> None:
    """TF32 and cuDNN's autotuner, on CUDA only (process-wide flags: set once per worker)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)
    torch.backends.cudnn.allow_tf32 = bool(train.tf32)
    torch.backends.cudnn.benchmark = bool(train.cudnn_benchmark)


def prepare_model(model: torch.nn.Module, train: Any, compile_backend: str = "inductor") -> torch.nn.Module:
    """NHWC (``channels_last``) and the UNet compiled in place (``compile``), before DeepSpeed wraps the
    model.

    channels_last converts only the frozen VAE's weights: the weights DeepSpeed trains must stay
    contiguous (ZeRO broadcasts them as bytes and keeps them as views of its flat buffers). The
    images (:func:`to_memory_format`) and so the latents and every activation after them are NHWC,
    and a convolution runs in its input's memory format, whatever its weight's.
    ``Module.compile`` keeps the module and its state-dict keys (``torch.compile(m)`` would prefix
    them with ``_orig_mod.``), so checkpoints and packages are the same either way; the taps and the
    attention-map processors run inside the compiled forward."""
    if train.channels_last:
        model.backbone.vae.to(memory_format=torch.channels_last)
    if train.compile:
        model.backbone.unet.compile(backend=compile_backend)
    return model


def autocast(device: torch.device, dtype: str) -> Any:
    """Inference and evaluation in ``dtype`` ("fp32": as the weights are; "bf16": torch.autocast, the
    weights stay fp32 and matmuls and convolutions run in bf16). Outputs are read as fp32 after."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def to_memory_format(images: torch.Tensor, train: Any) -> torch.Tensor:
    """``[B,3,H,W]`` images in the model's memory format."""
    return images.contiguous(memory_format=torch.channels_last) if train.channels_last else images
