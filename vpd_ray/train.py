"""``python -m vpd_ray.train CONFIG [key=value ...] [--dry-run] [--remote-check [PREFIX]]``: the main job.

Validates the config (one line, exit 2, before any worker starts), prints the plan
(:mod:`vpd_ray.plan`; ``--dry-run`` stops there), checks the paths only the workers see on a worker
node (``--remote-check``, :mod:`vpd_ray.preflight`), saves the config in the run directory
``<run.storage_path>/<run.name>`` (a local one if the storage is remote), runs a Ray Train
``TorchTrainer`` over :func:`vpd_ray.engine.loop.train_loop`, and writes a model package of the best
checkpoint to ``<run dir>/package``. Re-running with the same ``run.name`` and ``run.storage_path``
resumes from the run's latest checkpoint (Ray Train v2 has no ``resume_from_checkpoint``).

Test hook: ``VPD_FAIL_ONCE_AT_STEP=N`` makes the last worker exit once after step N.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

FAIL_ENV = "VPD_FAIL_ONCE_AT_STEP"


def build_trainer(cfg: DictConfig, loop_extra: dict[str, Any] | None = None):
    """The ``TorchTrainer`` of a validated config (GPU: NCCL; CPU: gloo)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vpd_ray.config import task_metric
    from vpd_ray.engine.loop import train_loop

    metric, mode = task_metric(cfg)
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=dict(cfg.scaling.resources_per_worker) or None,
    )
    run_config = RunConfig(
        name=cfg.run.name,
        storage_path=cfg.run.storage_path,
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.checkpoint.keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        ),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
    )
    loop_config = {"config": OmegaConf.to_container(cfg, resolve=True), **(loop_extra or {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
    )


def best_checkpoint(result: Any, cfg: DictConfig) -> Any:
    """The best reported checkpoint by the configured metric (the latest if none carries it)."""
    from vpd_ray.config import task_metric

    metric, mode = task_metric(cfg)
    scored = [(c, m[metric]) for c, m in (result.best_checkpoints or []) if metric in m]
    if not scored:
        return result.checkpoint
    pick = min if mode == "min" else max
    return pick(scored, key=lambda cm: cm[1])[0]


def fit(cfg: DictConfig, deferred: list | None = None) -> Any:
    """Train (or resume) the run of a validated config; returns the Ray Train ``Result``.

    ``deferred``: path checks left for a worker node (:func:`vpd_ray.config.deferred_checks`), run
    once Ray is up and before anything is written.
    """
    import ray

    from vpd_ray import launch
    from vpd_ray.config import local_run_dir, to_yaml

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster, else a local one
    launch.check_remote_paths(cfg, deferred or [])
    run_dir = local_run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    extra = {}
    if os.environ.get(FAIL_ENV):
        extra["fail_once_at_step"] = int(os.environ[FAIL_ENV])
    result = build_trainer(cfg, extra).fit()
    if cfg.run.export:
        from vpd_ray.engine.checkpoint import export_checkpoint

        checkpoint = best_checkpoint(result, cfg)
        with checkpoint.as_directory() as directory:  # a local copy if the storage is remote
            out = export_checkpoint(directory, os.path.join(run_dir, "package"))
        print(f"[vpd] model package: {out} (from {checkpoint.path})", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from vpd_ray import launch
    from vpd_ray.config import deferred_checks, load_or_exit
    from vpd_ray.plan import describe

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (e.g. configs/sample.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    launch.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    remote = launch.remote_prefixes(args)
    cfg = load_or_exit(args.config, args.overrides, remote=remote)
    launch.show(describe(cfg))
    deferred = deferred_checks(cfg, remote=remote)
    if args.dry_run:
        launch.finish_dry_run(deferred)
    result = fit(cfg, deferred)
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
