"""The training job, driver side: build the ``TorchTrainer`` (the one helper every Ray Train run of
the project uses), fit or resume the run, and export its best checkpoint as a model package.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf


def torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: DictConfig, name: str, *,
                  num_workers: int | None = None, checkpoint_config: Any = None, max_failures: int = 0,
                  callbacks: Sequence[Any] = ()) -> Any:
    """Every ``TorchTrainer`` of the project: ``loop`` on ``scaling`` workers (a fixed count, or Ray
    Train's elastic ``(min, max)``; ``num_workers`` overrides it), placed by ``scaling.placement_strategy``,
    the resolved config in ``loop_config["config"]``, the run in
    ``<run.storage_path>/<name>``. Ray's own TorchConfig picks NCCL with GPUs and gloo without."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vpd_ray.config import worker_range

    low, high = worker_range(cfg)
    s = cfg.scaling
    scaling = ScalingConfig(num_workers=num_workers or (high if low == high else (low, high)), use_gpu=s.use_gpu,
                            resources_per_worker=dict(s.resources_per_worker) or None,
                            placement_strategy=s.placement_strategy,
                            elastic_resize_monitor_interval_s=s.elastic_resize_monitor_interval_s)
    run_config = RunConfig(name=name, storage_path=cfg.run.storage_path, checkpoint_config=checkpoint_config,
                           failure_config=FailureConfig(max_failures=max_failures), callbacks=list(callbacks))
    loop_config = {"config": OmegaConf.to_container(cfg, resolve=True), **loop_config}
    return TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)


def build_trainer(cfg: DictConfig, loop_extra: dict[str, Any] | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """The training ``TorchTrainer`` of a validated config: best ``keep`` checkpoints by the task
    metric, ``run.max_failures`` restarts; ``callbacks`` (e.g. Tune's report callback) go to its RunConfig."""
    from ray.train import CheckpointConfig

    from vpd_ray.config import task_metric
    from vpd_ray.engine.loop import train_loop

    metric, mode = task_metric(cfg)
    keep = CheckpointConfig(num_to_keep=cfg.train.checkpoint.keep, checkpoint_score_attribute=metric,
                            checkpoint_score_order=mode)
    return torch_trainer(train_loop, dict(loop_extra or {}), cfg, cfg.run.name, checkpoint_config=keep,
                         max_failures=cfg.run.max_failures, callbacks=callbacks)


def best_checkpoint(result: Any, cfg: DictConfig) -> Any:
    """The best reported checkpoint by the configured metric (the latest if none carries it)."""
    from vpd_ray.config import task_metric

    metric, mode = task_metric(cfg)
    scored = [(c, m[metric]) for c, m in (result.best_checkpoints or []) if metric in m]
    if not scored:
        return result.checkpoint
    pick = min if mode == "min" else max
    return pick(scored, key=lambda cm: cm[1])[0]


def latest_step(cfg: DictConfig) -> tuple[int, str] | None:
    """``(step, checkpoint path)`` of the run's latest complete checkpoint in its storage, or None."""
    import json

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(cfg.run.storage_path)
    run = f"{root.rstrip('/')}/{cfg.run.name}"
    if fs.get_file_info(run).type == pyarrow.fs.FileType.NotFound:
        return None
    found = []
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(run)):
        meta = f"{entry.path}/meta.json"
        if entry.base_name.startswith("checkpoint_") and fs.get_file_info(meta).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(meta) as f:
                found.append((json.loads(f.read())["step"], entry.path))
    return max(found) if found else None


def check_resume(cfg: DictConfig) -> tuple[int, str] | None:
    """``run.resume`` against what the run directory holds (auto: resume if there is a checkpoint;
    never: refuse an existing run; must: refuse a run with nothing to resume). Raises InputError."""
    from vpd_ray.errors import InputError

    latest = latest_step(cfg)
    where = f"{cfg.run.storage_path}/{cfg.run.name}"
    if cfg.run.resume == "never" and latest:
        raise InputError(f"run.resume=never: {where} already has checkpoints (latest at step {latest[0]}); "
                         "choose another run.name or set run.resume=auto")
    if cfg.run.resume == "must" and not latest:
        raise InputError(f"run.resume=must: {where} has no checkpoint to resume")
    return latest


class TrainingFailed(Exception):
    """Training failed after Ray Train's restarts; the message is one line, the traceback in errors.log."""


def fit(cfg: DictConfig, deferred: list | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """Train (or resume) the run of a validated config; returns the Ray Train ``Result``, or None when
    the run had finished already (one line says so: nothing is started or written).

    ``deferred``: path checks left for a worker node (:func:`vpd_ray.config.deferred_checks`), run
    once Ray is up and before anything is written. An input error on the workers (corrupt data over
    the limit, a forbidden field, a non-finite loss under nan_policy stop) stops the run at once,
    without Ray Train's retries, and is raised here as :class:`~vpd_ray.errors.InputError`. A run
    that fails after its restarts raises :class:`TrainingFailed`. The console: :mod:`vpd_ray.engine.console`.
    """
    import time

    import ray
    import ray.train

    from vpd_ray.config import local_run_dir, to_yaml
    from vpd_ray.engine import console as run_console
    from vpd_ray.engine.console import append_event
    from vpd_ray.engine import input_errors
    from vpd_ray.errors import InputError, fault_line
    from vpd_ray.preflight import check_remote_paths

    latest = check_resume(cfg)
    run_dir = local_run_dir(cfg)
    if latest and latest[0] >= cfg.train.max_steps:
        print(f"[vpd] run {cfg.run.name} finished at step {latest[0]} ({latest[1]}); its package: "
              f"{os.path.join(run_dir, 'package')}. Nothing to do (raise train.max_steps to train on)", flush=True)
        return None
    if not ray.is_initialized():
        ray.init(log_to_driver=cfg.run.verbose)  # RAY_ADDRESS / a running cluster, else a local one
    check_remote_paths(cfg, deferred or [])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    extra = {}
    start = time.perf_counter()
    with run_console.Console(run_dir, waiting=lambda: waiting_line(cfg)) as console:
        extra[run_console.KEY] = console.handle
        every = [*callbacks, run_console.fault_lines(console.handle, cfg.run.max_failures)]
        try:
            result = input_errors.fit(lambda box: build_trainer(cfg, {**extra, **box}, every))
        except InputError as err:
            append_event(run_dir, f"stopped, not retried: {err}")
            raise
        except ray.train.TrainingFailedError as err:
            console.record(run_console.traceback_of(err))
            failures = getattr(err, "worker_failures", None) or {}
            what = "; ".join(f"rank {r}: {fault_line(e)}" for r, e in sorted(failures.items())) or fault_line(err)
            append_event(run_dir, f"failed: {what}")
            raise TrainingFailed(f"{what} (after run.max_failures={cfg.run.max_failures} restarts; "
                                 f"traceback: {console.errors})") from None
    package = None
    if cfg.run.export:
        import torch

        from vpd_ray.engine.checkpoint import export_checkpoint

        if not torch.cuda.is_available():  # the consolidation is CPU work: no "Setting accelerator to CPU" notice
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

        checkpoint = best_checkpoint(result, cfg)
        with checkpoint.as_directory() as directory:  # a local copy if the storage is remote
            package = export_checkpoint(directory, os.path.join(run_dir, "package"))
    print(summary(result, cfg, time.perf_counter() - start, package), flush=True)
    return result


def waiting_line(cfg: DictConfig) -> str:
    """What a worker group that has not started waits for: the workers and resources it asks for and
    what the cluster has free (said by the console: Ray Train waits without limit for them to fit)."""
    import ray

    from vpd_ray.config import worker_range

    low, high = worker_range(cfg)
    need = dict(cfg.scaling.resources_per_worker) or {"CPU": 1, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    free, total = ray.available_resources(), ray.cluster_resources()
    count = f"{low}" if low == high else f"at least {low} (up to {high})"
    each = ", ".join(f"{name} {amount:g}" for name, amount in need.items())
    have = ", ".join(f"{name} {free.get(name, 0):g} of {total.get(name, 0):g}" for name in need)
    return (f"waiting for the worker group: {count} workers of {each} each (scaling.num_workers, "
            f"scaling.resources_per_worker); the cluster has {have} free. Ray Train starts it once they fit "
            "(a node joins, another job ends); `ray status` shows the demand")


def summary(result: Any, cfg: DictConfig, seconds: float, package: str | None) -> str:
    """The run's last line: steps, time, the best validation metric and its step, the package."""
    from vpd_ray.config import task_metric

    metric, mode = task_metric(cfg)
    scored = [m for _, m in (result.best_checkpoints or []) if metric in m]
    best = (min if mode == "min" else max)(scored, key=lambda m: m[metric]) if scored else None
    parts = [f"[vpd] done: step {(result.metrics or {}).get('step', '?')}/{cfg.train.max_steps} in {seconds / 60:.1f} min"]
    if best is not None:
        parts.append(f"best {metric} {best[metric]:.4g} at step {best.get('step', '?')}")
    parts.append(f"model package: {package}" if package else f"run: {cfg.run.storage_path}/{cfg.run.name}")
    return " · ".join(parts)
