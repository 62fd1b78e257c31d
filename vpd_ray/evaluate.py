"""``python -m vpd_ray.evaluate CONFIG --checkpoint PATH [--out JSON] [--report DIR] [key=value ...]``

Runs every task's test protocol on its ``test_shards`` (from CONFIG), split over the Ray workers of
``scaling`` (each sample exactly once; metric sums all-reduced), prints the seed's row
(RMSE d1 d2 d3 REL log10 where the task has them) and writes all metrics as JSON.

``--report DIR`` also writes where the model fails (:mod:`vpd_ray.report`): ``DIR/report.md`` and
``DIR/report.html`` with, per task, the row, per-scene (depth) or per-class (seg) scores, a
histogram of the per-image (refer: per-sentence) scores and the ``--report-worst`` worst samples
drawn; the metrics are the same with or without it.

``PATH`` is a model package (``vpd_ray.export``), a training checkpoint or run directory, or the
authors' released depth, ADE20K or RefCOCO ``.pth`` (loaded into the model CONFIG describes, in the
layout of its task; every key reported).
A checkpoint or run directory is consolidated once, in one Ray task, and its fp32 weights reach
every worker through the object store; a package is read by each worker (safetensors, mmapped).
The job is :mod:`vpd_ray.engine.eval_job`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> None:
    import ray

    from vpd_ray import launch
    from vpd_ray.config import deferred_checks, exit_config_error, load_or_exit
    from vpd_ray.engine.eval_job import evaluate, seed_rows
    from vpd_ray.paths import PathCheck, is_remote, problem
    from vpd_ray.errors import InputError
    from vpd_ray.plan import describe_evaluation, split_samples
    from vpd_ray.preflight import check_remote_paths

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config whose tasks name test_shards")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--checkpoint", required=True, help="package, checkpoint/run dir, or the authors' .pth")
    parser.add_argument("--out", default=None, help="JSON file to write (default: <checkpoint>.eval.json)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also write DIR/report.md and DIR/report.html: where the model fails")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the model under bf16 autocast (weights stay fp32); compare with an fp32 run")
    parser.add_argument("--report-worst", type=int, default=8, metavar="K",
                        help="the report draws each task's K worst samples (default 8)")
    launch.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --checkpoint
    if args.report_worst < 0:
        parser.error(f"--report-worst must be 0 or more, got {args.report_worst}")
    remote = launch.remote_prefixes(args)
    cfg = load_or_exit(args.config, args.overrides, need=("test_shards",), remote=remote)
    checkpoint = PathCheck("--checkpoint", "path", args.checkpoint)
    deferred = deferred_checks(cfg, need=("test_shards",), remote=remote)
    if is_remote(checkpoint, remote):
        deferred.append(checkpoint)
    elif problem(checkpoint):
        exit_config_error(problem(checkpoint))
    launch.show(describe_evaluation(cfg, args.checkpoint))
    if args.report is not None:
        launch.show([f"report: {args.report}/report.md and report.html, {args.report_worst} worst samples per task"])
    if args.dry_run:
        launch.finish_dry_run(deferred)
    if args.report is not None:
        try:  # an unwritable DIR fails now, not after the evaluation
            os.makedirs(args.report, exist_ok=True)
        except OSError as err:
            exit_config_error(f"--report: cannot create {args.report}: {err.strerror}")
    if not ray.is_initialized():
        ray.init(log_to_driver=cfg.run.verbose)  # worker output stays in Ray's logs unless run.verbose
    check_remote_paths(cfg, deferred)
    try:
        metrics = evaluate(cfg, args.checkpoint, args.report, args.report_worst, args.dtype)
    except InputError as err:  # corrupt test data over the limit, an unloadable checkpoint: one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for row in seed_rows(metrics):
        print(row)
    for name, expected in split_samples(cfg, "test_shards").items():
        scored = int(metrics.get(f"{name}/samples", 0))
        if expected is not None and scored < expected:
            print(f"warning: tasks.{name}: scored {scored} of the {expected} samples its test shards hold "
                  "(skipped corrupt samples, data.max_corrupt); the metrics cover those only", file=sys.stderr)
    out = args.out or os.path.abspath(args.checkpoint).rstrip("/") + ".eval.json"
    with open(out, "w") as f:
        json.dump({"checkpoint": os.path.abspath(args.checkpoint), "dtype": args.dtype, "metrics": metrics}, f, indent=1)
    print(f"metrics written to {out}")
    if args.report is not None:
        print(f"report written to {os.path.join(args.report, 'report.md')} and report.html")


if __name__ == "__main__":
    main()
