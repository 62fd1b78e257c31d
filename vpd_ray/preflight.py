"""Path checks on a worker node, before the trainer starts.

The driver checks what it can see (:func:`vpd_ray.config.validate`). What it cannot see (``s3://``
shards, paths under a ``--remote-check`` prefix, such as a ``/data`` mounted only on the GPU nodes)
is checked here by one small Ray task with a training worker's resources, so it runs where the
workers will run. A problem is the same one-line ``config error`` and exit code 2, seconds after
Ray starts, instead of a stack trace from every worker, once per ``run.max_failures``.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from vpd_ray.paths import PathCheck

log = logging.getLogger(__name__)


def _worker_options(cfg: DictConfig) -> dict:
    """A training worker's placement (its GPU and custom resources) at a fraction of its CPUs."""
    resources = dict(cfg.scaling.resources_per_worker)
    gpus = resources.pop("GPU", 1 if cfg.scaling.use_gpu else 0)
    cpus = min(resources.pop("CPU", 1), 1)
    return {"num_cpus": cpus, "num_gpus": gpus, "resources": resources or None}


def _run_checks(checks: list[PathCheck]) -> tuple[str, list[str]]:
    import socket

    from vpd_ray.paths import problems

    return socket.gethostname(), problems(checks)


def check_on_worker(cfg: DictConfig, checks: list[PathCheck]) -> list[str]:
    """The problems of ``checks`` as seen from a worker node (Ray must be initialised)."""
    if not checks:
        return []
    import ray

    task = ray.remote(_run_checks).options(**_worker_options(cfg), max_retries=0)
    node, found = ray.get(task.remote(checks))
    log.info("[vpd] checked %d path(s) on worker node %s: %s", len(checks), node, "ok" if not found else found[0])
    return found


def check_remote_paths(cfg: DictConfig, deferred: list) -> None:
    """Run the deferred path checks on a worker node (Ray initialised); a problem exits 2."""
    from vpd_ray.config import exit_config_error

    found = check_on_worker(cfg, deferred)
    if found:
        exit_config_error(found[0])
