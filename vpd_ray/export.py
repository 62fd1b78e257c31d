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
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a checkpoint directory or a run directory")
    parser.add_argument("out", help="package directory to write")
    args = parser.parse_args(argv)
    from vpd_ray.engine.checkpoint import export_checkpoint

    try:
        out = export_checkpoint(args.source, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"model package written to {out}")


if __name__ == "__main__":
    main()
