"""``python -m vpd_ray.bench data|train|infer|export|gpu [...]``: the benchmarks, each printing a table.

Each subcommand lives in ``vpd_ray/benchmarks/<name>.py`` as ``main(argv) -> int`` and is imported
only when asked for, so one benchmark's heavy dependencies never slow another.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("data", "train", "infer", "export", "gpu")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m vpd_ray.bench {{{'|'.join(BENCHMARKS)}}} [options]  (--help after the name)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"vpd_ray.benchmarks.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
