"""``python -m vpd_ray.train CONFIG [key=value ...] [--dry-run] [--remote-check [PREFIX]]``: the main job.

Validates the config (one line, exit 2, before any worker starts), prints the plan
(:mod:`vpd_ray.plan`; ``--dry-run`` stops there), checks the paths only the workers see on a worker
node (``--remote-check``, :mod:`vpd_ray.preflight`), saves the config in the run directory
``<run.storage_path>/<run.name>`` (a local one if the storage is remote), runs a Ray Train
``TorchTrainer`` over :func:`vpd_ray.engine.loop.train_loop`, and writes a model package of the best
checkpoint to ``<run dir>/package``. Re-running with the same ``run.name`` and ``run.storage_path``
resumes from the run's latest checkpoint (Ray Train v2 has no ``resume_from_checkpoint``).

The run machinery is :mod:`vpd_ray.engine.train_job`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    from vpd_ray import launch
    from vpd_ray.config import EXIT_CONFIG_ERROR, deferred_checks, load_or_exit
    from vpd_ray.engine.train_job import TrainingFailed, check_resume, fit
    from vpd_ray.errors import InputError
    from vpd_ray.plan import describe

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (e.g. configs/sample.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    launch.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    remote = launch.remote_prefixes(args)
    cfg = load_or_exit(args.config, args.overrides, remote=remote)
    try:
        if not args.dry_run:
            check_resume(cfg)  # a refused run.resume is one line at once, before the plan builds the model
        launch.show(describe(cfg))
        deferred = deferred_checks(cfg, remote=remote)
        if args.dry_run:
            launch.finish_dry_run(deferred)
        fit(cfg, deferred)
    except InputError as err:  # stopped at once, not retried: the same input fails the same way
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except TrainingFailed as err:  # a fault that outlived run.max_failures restarts
        print(f"training failed: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
