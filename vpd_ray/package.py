"""Model packages: the output of training and the input of inference and evaluation.

A package is a directory with ``model.safetensors`` (every weight, the frozen VAE and the class
embeddings included, fp32), ``config.yaml`` (the resolved run config) and ``architecture.json``
(the diffusers configs of the UNet and VAE). Loading needs neither Ray nor DeepSpeed, nor the
Stable Diffusion weights the run started from: the model is rebuilt from the config and the
architecture, and the weights are loaded strictly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from vpd_ray.atomic import atomic_path
from vpd_ray.errors import DataError
from vpd_ray.modeling import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
ARCHITECTURE = "architecture.json"


def read_architecture(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, ARCHITECTURE)) as f:
        return json.load(f)


def write_architecture(directory: str, arch: dict[str, Any]) -> None:
    with open(os.path.join(directory, ARCHITECTURE), "w") as f:
        json.dump(arch, f, indent=1, default=list)


def load_config(path: str) -> DictConfig:
    from vpd_ray.config import compose

    return compose(path)


def export_package(state_dict: Mapping[str, Any], config_yaml: str, arch: dict[str, Any], out_dir: str) -> str:
    """Write the weights (fp32) and the config; returns ``out_dir``.

    ``state_dict`` maps names to tensors or to lazy tensors (anything with ``.shape`` and a
    ``.contiguous()`` that yields the values: DeepSpeed's ``GatheredTensor``, mmapped tensors, see
    :func:`vpd_ray.engine.checkpoint.lazy_state_dict`). The names and shapes are checked against the
    model built on the meta device first, so a package that ``load_package`` would reject is never
    written, and the weights are then streamed tensor by tensor: peak memory is one tensor, not a
    second and third copy of the model. ``model.safetensors`` is written last, under a temporary
    name renamed into place, so it only appears complete.
    """
    from vpd_ray.config import compose

    cfg = compose(base=OmegaConf.to_container(OmegaConf.create(config_yaml)))
    with torch.device("meta"):
        own = build_model(cfg, arch).state_dict()
    check_fits(own, state_dict, source="the consolidated checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        f.write(config_yaml)
    write_architecture(out_dir, arch)
    write_safetensors(os.path.join(out_dir, WEIGHTS), state_dict, metadata={"format": "vpd_ray"})
    return out_dir


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` of ``tensors`` cast to fp32, with the same bytes, one tensor at a time.

    The format: 8-byte little-endian header length, a compact JSON header (``__metadata__`` first,
    then the tensors by name with dtype, shape and ``data_offsets``), space-padded to 8 bytes, then
    the raw data in header order. ``save_file`` sorts by dtype then name; all here are F32. The file
    is written through :func:`vpd_ray.atomic.atomic_path`.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        shape = [int(n) for n in tensors[name].shape]
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            tensor = tensors[name].contiguous().detach().float()  # this one tensor in memory
            if list(tensor.shape) != header[name]["shape"]:  # a lazy tensor that lied would shift every offset
                raise ValueError(f"{name}: values of shape {tuple(tensor.shape)}, "
                                 f"announced {tuple(header[name]['shape'])}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy


def check_fits(own: Mapping[str, Any], state_dict: Mapping[str, Any], source: str) -> None:
    """One readable error listing what is missing, unexpected or mis-shaped (``own``: the model's state)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights from {source} do not fit the model: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} mis-shaped {shapes[:3]}"
        )


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one readable error listing what is missing, unexpected or mis-shaped."""
    check_fits(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict, strict=True)


class PackageError(DataError, ValueError):
    """A directory whose files are not a vpd_ray package (a ValueError for the callers that catch one)."""


def check_package(path: str) -> None:
    """The file check of :func:`load_package`, cheap enough for a driver before any worker starts:
    the three files exist and the weights parse as safetensors (the header only; safetensors' own
    error names no file, and a model build before it would print pages of its own)."""
    from safetensors import SafetensorError, safe_open

    weights = os.path.join(path, WEIGHTS)
    for needed in (weights, os.path.join(path, CONFIG), os.path.join(path, ARCHITECTURE)):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{path!r} is not a model package: {os.path.basename(needed)} missing")
    try:
        with safe_open(weights, framework="pt"):
            pass
    except SafetensorError as err:
        raise PackageError(f"{weights} is not a safetensors file ({err}); {path!r} is not a vpd_ray package") from None


def load_package(path: str) -> tuple["Any", DictConfig]:
    """``(VPDModel in eval mode, resolved config)`` from a package directory."""
    from safetensors.torch import load_file

    check_package(path)
    weights, config_path = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    cfg = load_config(config_path)
    model = build_model(cfg, read_architecture(path))
    load_strict(model, load_file(weights), source=weights)
    return model.eval(), cfg
