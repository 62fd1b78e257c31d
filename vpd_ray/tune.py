"""``python -m vpd_ray.tune CONFIG [key=value ...]``: a Ray Tune sweep of full training runs.

CONFIG is a sweep file (``configs/tune_nyu.yaml``, ``configs/tune_sample.yaml``) naming a training
config and a search space. ``key=value`` pairs set sweep keys (``num_samples=16``) or, for any other
key, are applied to every trial's training config (``train.max_steps=2000``). Each trial is a
complete Ray Train + DeepSpeed run, stopped early by ASHA on the task's validation metric. Results
land in ``<storage_path>/<name>/``: ``trials.csv``, ``trials.md``, ``trials.png``, ``best.yaml``
(train it with ``python -m vpd_ray.train``) and ``best_package/``. Running the same command again
resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import os
import sys

from vpd_ray import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="sweep YAML, e.g. configs/tune_sample.yaml")
    parser.add_argument("overrides", nargs="*", help="sweep or training key=value overrides")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    launch.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    remote = launch.remote_prefixes(args)

    from vpd_ray.config import ConfigError, EXIT_CONFIG_ERROR, deferred_checks, load
    from vpd_ray.plan import describe
    from vpd_ray.sweep.config import load_sweep, reports_per_trial

    try:
        sweep = load_sweep(args.config, args.overrides)
        base = load(sweep.train_config, list(sweep.overrides), remote=remote)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    launch.show(describe(base))
    launch.show([f"sweep: {sweep.num_samples} trials of {', '.join(sweep.search_space)}, ASHA over "
                 f"{reports_per_trial(sweep, base)} validations per trial, results in "
                 f"{os.path.join(sweep.storage_path, sweep.name)}"])
    deferred = deferred_checks(base, remote=remote)
    if args.dry_run:
        launch.finish_dry_run(deferred)

    import ray

    from vpd_ray.preflight import check_remote_paths
    from vpd_ray.sweep.runner import build_tuner, init_ray, write_outputs

    init_ray(args.ray_address, args.num_cpus)
    check_remote_paths(base, deferred)
    try:
        result_grid = build_tuner(sweep, base).fit()
        best = write_outputs(sweep, base, result_grid)
    finally:
        ray.shutdown()
    out = os.path.join(sweep.storage_path, sweep.name)
    print(f"[vpd] sweep {sweep.name}: {len(result_grid)} trials, best {best['trial_id']} -> {out}/best.yaml, "
          f"{out}/best_package", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
