"""Weights-only checkpoints (``train.checkpoint.weights_every``): light model packages between full ones.

A full checkpoint at SD-1.5 size is about 11.5 GiB (fp32 masters and both AdamW moments); the
weights alone, in the training dtype, plus the frozen fp32 modules are about 2 GiB. Each is a
complete model package (``model.safetensors``, ``config.yaml``, ``architecture.json``), so
``evaluate``, ``infer`` and ``export`` take it as it is, and a run can restart from it by hand. Under
``train.ema_eval`` the trainable weights in it are the EMA (what validation scores), in the training dtype.

They are written to ``<storage_path>/<run name>/weights/step_N`` through pyarrow's filesystem
layer (a local folder, S3, GCS), first under a temporary name, then moved into place, so a
half-written one is never visible; only the latest ``weights_keep`` are kept.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

TMP_PREFIX = ".tmp-"


def write_weights_package(state: dict[str, torch.Tensor], config_yaml: str, arch: dict[str, Any], storage_path: str,
                          subdir: str, name: str, keep: int) -> int:
    """Write ``state`` as a package ``<storage_path>/<subdir>/<name>``; returns its size in bytes."""
    import pyarrow.fs
    from safetensors.torch import save_file

    from vpd_ray.package import ARCHITECTURE, CONFIG, WEIGHTS, write_architecture

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    folder = f"{root.rstrip('/')}/{subdir}"
    with tempfile.TemporaryDirectory(prefix="vpd_weights_") as local:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(local, WEIGHTS),
                  metadata={"format": "vpd_ray", "content": "weights-only checkpoint"})
        with open(os.path.join(local, CONFIG), "w") as f:
            f.write(config_yaml)
        write_architecture(local, arch)
        size = sum(os.path.getsize(os.path.join(local, n)) for n in (WEIGHTS, CONFIG, ARCHITECTURE))
        tmp = f"{folder}/{TMP_PREFIX}{name}"
        fs.create_dir(tmp, recursive=True)
        pyarrow.fs.copy_files(local, tmp, destination_filesystem=fs)
    final = f"{folder}/{name}"
    if fs.get_file_info(final).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(final)  # a rerun of the same step after a restart
    fs.move(tmp, final)
    _prune(fs, folder, keep)
    return size


def _prune(fs: Any, folder: str, keep: int) -> None:
    """Delete all but the latest ``keep`` packages (names sort by step) and stale temporaries."""
    import pyarrow.fs

    dirs = [e for e in fs.get_file_info(pyarrow.fs.FileSelector(folder)) if e.type == pyarrow.fs.FileType.Directory]
    stale = [e.path for e in dirs if e.base_name.startswith(TMP_PREFIX)]  # left by a killed writer
    done = sorted(e.path for e in dirs if not e.base_name.startswith(TMP_PREFIX))
    for path in stale + done[:-keep]:
        fs.delete_dir(path)
