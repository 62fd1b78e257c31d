"""What the launching entry points (``train``, ``tune``, ``evaluate``) share: ``--dry-run``,
``--remote-check``, the printed plan, and the worker-side path check before the first worker starts."""

from __future__ import annotations

import argparse
import sys



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and validate the config, print the plan, exit 0 (no Ray, no weights loaded)")
    parser.add_argument("--remote-check", action="append", nargs="?", const="", default=[], metavar="PREFIX",
                        help="check paths under PREFIX (all paths and hub ids when given alone) on a worker node "
                             "instead of here; for a head node that does not mount the data. Repeatable. "
                             "s3://, gs://, ... URLs are always checked there")


def remote_prefixes(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.remote_check)


def show(lines: list[str]) -> None:
    for line in lines:
        print(f"[vpd] plan: {line}", flush=True)


def finish_dry_run(deferred: list) -> None:
    """After the plan: what a real launch would still check on a worker node, then exit 0."""
    if deferred:
        keys = ", ".join(dict.fromkeys(c.key for c in deferred))
        print(f"[vpd] plan: checked on a worker node at launch: {keys}", flush=True)
    print("[vpd] dry run: config valid, nothing started", flush=True)
    sys.exit(0)
