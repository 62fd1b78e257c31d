"""Checkpoint directories: DeepSpeed's sharded state plus what DeepSpeed does not keep.

Layout of one checkpoint (every rank writes its own DeepSpeed files, rank 0 the rest)::

    state/                 DeepSpeed save_checkpoint tag: model states + per-rank optimizer shards
    meta.json              step, data positions (sample level), param-group names, nan skips
    config.yaml            the resolved run config
    frozen.safetensors     fp32 weights of modules that never train (VAE, class embeddings)
    architecture.json      diffusers configs of the UNet and VAE (vpd_ray.package.architecture)
    ema.safetensors        fp32 EMA of the trainable weights, only with train.ema_decay > 0 (vpd_ray.engine.ema)
    complete               empty; written in storage once every rank's part is persisted (the resume
                           fallback of vpd_ray.engine.loop trusts only checkpoints that have it)

The frozen modules are outside the DeepSpeed engine (the VAE: not partitioned, not optimised) or
cast to bf16 by it (class-embedding buffers), so the checkpoint keeps their exact fp32 values
itself and a model package never depends on the original weight files.

DeepSpeed's own loaders unpickle with ``weights_only=False``; :func:`assert_safe` scans every pickle
without running it and refuses any global outside DeepSpeed's three bookkeeping classes.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import torch

TAG = "state"
META = "meta.json"
CONFIG = "config.yaml"
FROZEN = "frozen.safetensors"
EMA = "ema.safetensors"
COMPLETE = "complete"
# The only non-tensor classes DeepSpeed pickles into its checkpoints (checked on 0.19).
_DEEPSPEED_GLOBALS = {
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
}


def assert_safe(directory: str) -> None:
    """Refuse a checkpoint whose pickles name any global beyond DeepSpeed's bookkeeping classes."""
    for root, _, files in os.walk(directory):
        for name in files:
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _DEEPSPEED_GLOBALS
            if unsafe:
                raise ValueError(f"refusing to load {path}: it pickles untrusted globals {sorted(unsafe)}")


def is_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META)) and os.path.isdir(os.path.join(directory, TAG))


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the parameters and buffers of modules with no trainable parameter.

    A module counts as frozen when none of its parameters requires grad (the VAE, class-embedding
    holders); BatchNorm running statistics belong to trainable modules and are left to DeepSpeed.
    """
    out = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own or any(p.requires_grad for p in module.parameters()):
            continue
        for name, tensor in own:
            out[f"{prefix}.{name}" if prefix else name] = tensor.detach().float().cpu().clone()
    return out


def write_rank0_files(
    directory: str, meta: dict[str, Any], config_yaml: str, frozen: dict[str, torch.Tensor], arch: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """The rank-0 part; ``ema``: the EMA state (``EMA.state_dict()``), written as ``ema.safetensors`` if given."""
    from safetensors.torch import save_file

    from vpd_ray.package import write_architecture, write_safetensors

    write_architecture(directory, arch)
    save_file({k: v.contiguous() for k, v in frozen.items()}, os.path.join(directory, FROZEN))
    if ema is not None:  # fp32, under a temporary name renamed into place
        write_safetensors(os.path.join(directory, EMA), ema, metadata={"format": "vpd_ray", "content": "ema"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(config_yaml)
    # meta.json last: its presence marks the rank-0 part complete (is_checkpoint).
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def _stage0_fp32(directory: str, group_names: list[list[str]]) -> dict[str, torch.Tensor]:
    """ZeRO-0 + bf16 keeps fp32 masters in the optimizer's ``fp32_groups``, in param-group order.

    The file is mmapped: the tensors are views of it, read when used (buffers stay in their saved dtype).
    """
    import deepspeed.utils.tensor_fragment  # noqa: F401  (classes named in the pickle)

    path = os.path.join(directory, TAG, "mp_rank_00_model_states.pt")
    states = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    module = dict(states["module"])
    fp32_groups = states["optimizer"].get("fp32_groups") if isinstance(states.get("optimizer"), dict) else None
    if fp32_groups is None:  # fp32 training: the module weights are the masters
        return module
    for names, tensors in zip(group_names, fp32_groups):
        if len(names) != len(tensors):
            raise ValueError(f"{directory}: param-group sizes {len(names)} != {len(tensors)} saved masters")
        module.update({name: t.detach() for name, t in zip(names, tensors)})
    return module


class _Lazy:
    """A tensor read when asked for: ``shape`` now, the values from ``contiguous()`` (GatheredTensor's interface)."""

    def __init__(self, shape: torch.Size, read: Callable[[], torch.Tensor]):
        self.shape, self._read = shape, read

    def contiguous(self) -> torch.Tensor:
        return self._read()


def _gather(parts: list[torch.Tensor], offset: int, shape: torch.Size) -> torch.Tensor:
    """The ``shape`` tensor at ``offset`` of the concatenation of ``parts`` (1-d), reading only its slices."""
    end, start, pieces = offset + shape.numel(), 0, []
    for part in parts:
        lo, hi = max(offset, start), min(end, start + part.numel())
        if lo < hi:
            pieces.append(part[lo - start : hi - start])
        start += part.numel()
    return torch.cat(pieces).view(shape)


def _zero12_fp32(directory: str) -> dict[str, Any]:
    """ZeRO-1/2: every trainable tensor gathered from the ranks' mmapped fp32 partitions when asked for.

    DeepSpeed's own lazy mode concatenates each param group's partitions first (the whole fp32
    model in memory) after reading the model states without mmap (the whole bf16 module); here
    both files stay mmapped and one tensor at a time is copied. DeepSpeed's layout: a param group
    is its ranks' ``single_partition_of_fp32_groups`` end to end, the params in ``param_shapes``
    order, each followed by its alignment padding, the total padded to a multiple of 2 x world.
    """
    from unittest import mock

    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    ds_dir = os.path.join(directory, TAG)
    states = torch.load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"), map_location="cpu", mmap=True,
                        weights_only=False)
    # Without its per-file tqdm bar ("Loading checkpoint shards"): the export at the end of a run would
    # put it on the console after the summary, and the files load in a blink (mmapped).
    with mock.patch.object(zero_to_fp32, "tqdm", lambda files, **_: files):
        _, world, flat_groups, paddings = zero_to_fp32.parse_optim_states(zero_to_fp32.get_optim_files(ds_dir), ds_dir)
    state = {k: v for k, v in states["module"].items() if k in states["buffer_names"]}
    state.update({k: states["frozen_param_fragments"][k] for k in states.get("frozen_param_shapes") or {}})
    for group, shapes in enumerate(states["param_shapes"]):
        parts = [rank[group] for rank in flat_groups]  # world x (partition,)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            shape = torch.Size(shape)
            state[name] = _Lazy(shape, functools.partial(_gather, parts, offset, shape))
            offset += shape.numel() + (paddings[group][i] if paddings is not None else 0)
        saved = sum(p.numel() for p in parts)
        if -(-offset // (2 * world)) != -(-saved // (2 * world)):
            raise ValueError(f"{ds_dir}: param group {group} saves {saved} values, its params take {offset}: "
                             "not the ZeRO-1/2 layout of DeepSpeed 0.19")
    for alias, name in states["shared_params"].items():
        if name in state:
            state[alias] = state[name]
    return state


def _frozen_lazy(path: str) -> dict[str, _Lazy]:
    """The entries of ``frozen.safetensors`` (or ``ema.safetensors``), each read (one tensor) when used."""
    from safetensors import safe_open

    handle = safe_open(path, framework="pt")  # kept open by the closures below
    return {name: _Lazy(torch.Size(handle.get_slice(name).get_shape()), functools.partial(handle.get_tensor, name))
            for name in handle.keys()}


def lazy_state_dict(directory: str) -> dict[str, Any]:
    """:func:`consolidated_state_dict` with nothing read yet, for streaming it (``vpd_ray.export``).

    Each value has ``.shape`` and ``.contiguous()``, which reads that one tensor (call ``.float()``
    on it: module buffers keep their saved dtype) from the mmapped shards: views of the ZeRO-0 model
    states, gathers of the ZeRO-1/2 partitions, DeepSpeed's ``GatheredTensor`` for ZeRO-3, the
    frozen modules from ``frozen.safetensors``.
    """
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a vpd_ray checkpoint (no {META} / {TAG}/)")
    assert_safe(directory)  # before anything is unpickled with weights_only=False
    meta = read_meta(directory)
    if meta["zero_stage"] == 0:
        state = _stage0_fp32(directory, meta["param_group_names"])
    elif meta["zero_stage"] in (1, 2):
        state = _zero12_fp32(directory)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=TAG, lazy_mode=True)
    state.update(_frozen_lazy(os.path.join(directory, FROZEN)))
    return state


def consolidated_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model from a checkpoint of any ZeRO stage (zero_to_fp32-style).

    Trainable parameters come from the fp32 masters, buffers from DeepSpeed's module state,
    frozen modules from ``frozen.safetensors`` (they win: DeepSpeed only ever held bf16 copies).
    """
    # detach: DeepSpeed pickles its masters as Parameters, so their gathers require grad
    return {name: value.contiguous().detach().float() for name, value in lazy_state_dict(directory).items()}


def evaluated_lazy_state_dict(directory: str) -> dict[str, Any]:
    """:func:`lazy_state_dict` with the EMA weights (``ema.safetensors``) in place of the trained ones when
    the run validated on them (``train.ema_eval`` in its ``config.yaml``): what the run scored, so what
    its model package holds. A resume wants the trained weights: :func:`consolidated_state_dict`."""
    from vpd_ray.engine.ema import uses_ema

    state = lazy_state_dict(directory)
    with open(os.path.join(directory, CONFIG)) as f:
        if not uses_ema(f.read()):
            return state
    if not os.path.isfile(os.path.join(directory, EMA)):
        raise FileNotFoundError(f"{directory}: its run set train.ema_eval but the checkpoint has no {EMA}")
    state.update(_frozen_lazy(os.path.join(directory, EMA)))
    return state


def find_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the best complete checkpoint of the run at ``path``."""
    import glob

    from vpd_ray.config import compose, task_metric

    if is_checkpoint(path):
        return path
    found = sorted(d for d in glob.glob(os.path.join(path, "checkpoint_*")) if is_checkpoint(d))
    if not found:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint nor a run directory with complete checkpoints")
    metric, mode = task_metric(compose(os.path.join(found[-1], CONFIG)))
    scored = [(read_meta(d)["metrics"].get(metric), d) for d in found]
    scored = [(v, d) for v, d in scored if v is not None]
    if not scored:
        return found[-1]
    return (min if mode == "min" else max)(scored)[1]


def export_checkpoint(path: str, out_dir: str) -> str:
    """Consolidate the checkpoint at ``path`` (or the best of a run) into a package at ``out_dir``: the
    weights the run validated (:func:`evaluated_lazy_state_dict`)."""
    from vpd_ray.package import export_package, read_architecture

    directory = find_checkpoint(path)
    with open(os.path.join(directory, CONFIG)) as f:
        config_yaml = f.read()
    return export_package(evaluated_lazy_state_dict(directory), config_yaml, read_architecture(directory), out_dir)
