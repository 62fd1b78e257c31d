"""``python -m vpd_ray.export RUN_OR_CHECKPOINT OUT``: a model package from a training checkpoint.

``RUN_OR_CHECKPOINT`` is one checkpoint directory, or a run directory (``<storage_path>/<name>``),
whose best complete checkpoint by the run's checkpoint metric is used. ZeRO shards are
consolidated to fp32 (zero_to_fp32-style) and the frozen weights the checkpoint keeps on the side
are added, so the package holds every weight; see :mod:`vpd_ray.package`. The tensors are streamed
from the mmapped shards into ``model.safetensors`` (no full model is built), so peak memory stays
near the consolidated model's size, which the head of a cluster can afford at SD-1.5 scale.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


def find_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the best complete checkpoint of the run at ``path``."""
    from vpd_ray.config import compose, task_metric
    from vpd_ray.engine import checkpoint as ckpt

    if ckpt.is_checkpoint(path):
        return path
    found = sorted(d for d in glob.glob(os.path.join(path, "checkpoint_*")) if ckpt.is_checkpoint(d))
    if not found:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint nor a run directory with complete checkpoints")
    metric, mode = task_metric(compose(os.path.join(found[-1], ckpt.CONFIG)))
    scored = [(ckpt.read_meta(d)["metrics"].get(metric), d) for d in found]
    scored = [(v, d) for v, d in scored if v is not None]
    if not scored:
        return found[-1]
    return (min if mode == "min" else max)(scored)[1]


def export_checkpoint(path: str, out_dir: str) -> str:
    """Consolidate the checkpoint at ``path`` (or the best of a run) into a package at ``out_dir``."""
    from vpd_ray.engine import checkpoint as ckpt
    from vpd_ray.package import export_package, read_architecture

    directory = find_checkpoint(path)
    with open(os.path.join(directory, ckpt.CONFIG)) as f:
        config_yaml = f.read()
    return export_package(ckpt.lazy_state_dict(directory), config_yaml, read_architecture(directory), out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a checkpoint directory or a run directory")
    parser.add_argument("out", help="package directory to write")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.source, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"model package written to {out}")


if __name__ == "__main__":
    main()
