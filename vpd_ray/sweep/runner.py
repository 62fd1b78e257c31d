"""Run a sweep: one Tune trial per sampled config, each a full Ray Train + DeepSpeed run.

    Tuner(ASHA on the task metric, max_concurrent_trials from the cluster)
      trial = run_trial(config): compose the training config + sampled values, build the trainer's
              own TorchTrainer (vpd_ray.engine.train_job.build_trainer) named by the trial id, forward its
              validation reports to Tune, fit
    -> trials.csv / trials.md / trials.png, best.yaml, best_package/  in <storage_path>/<name>/

An interrupted sweep resumes with ``Tuner.restore``; an unfinished trial's TorchTrainer then finds
its own run directory (same name and storage path) and resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from vpd_ray.sweep import results, space

TRIALS_DIR = "trials"
# A trial's own process only waits on its TorchTrainer; the workers hold the real resources.
TRIAL_DRIVER_CPU = 0.01


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) or start a local instance, ready for Train-in-Tune.

    Ray Train's placement-group cleaner asks the State API whether a trial's controller is alive.
    Without ``RAY_ADDRESS`` it searches the machine for a cluster and fails where several Ray
    instances run (CI runners, shared hosts); the placement group of a trial that ASHA stopped is
    then never removed and the next trial waits for its CPUs/GPUs forever. So every worker gets
    its own cluster's address from a setup hook, and the dashboard (the State API) listens on
    127.0.0.1.
    """
    import ray

    def pin_ray_address() -> None:
        # Nested, so Ray ships it by value: it runs before a worker has the driver's import path.
        import os

        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    # RAY_CHDIR_TO_TRIAL_DIR=0: trials keep the driver's working directory, where the training
    # config's relative paths (shards, weights) point, as they do for ``python -m vpd_ray.train``.
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"worker_process_setup_hook": pin_ray_address,
                          "env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})


def trial_overrides(sweep: DictConfig, sampled: dict[str, Any], trial_id: str) -> list[str]:
    """The training overrides of one trial: the sweep's, the sampled values, and its own run dir."""
    return [
        *sweep.overrides,
        *(space.format_override(key, value) for key, value in sampled.items()),
        space.format_override("run.name", trial_id),  # quoted: "51456_00000" would parse as an int
        f"run.storage_path={os.path.join(sweep.storage_path, sweep.name, TRIALS_DIR)}",
        "run.export=false",  # only the best trial is exported, once, at the end
    ]


def run_trial(config: dict[str, Any], sweep: DictConfig) -> None:
    """The Tune function trainable: one TorchTrainer per trial, named by the trial id."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vpd_ray.config import load
    from vpd_ray.engine.train_job import build_trainer
    from vpd_ray.paths import EVERY_PATH

    trial_id = tune.get_context().get_trial_id()
    # Paths were checked at launch; a trial's process may run on a node that does not mount them.
    cfg = load(sweep.train_config, trial_overrides(sweep, config, trial_id), remote=EVERY_PATH)
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def max_concurrent_trials(base: DictConfig, requested: int | None) -> int:
    """Trials that fit the cluster at once: GPUs (or CPUs) / what one trial's workers take.

    More trials than that would each start a controller whose workers wait for resources that
    running trials hold.
    """
    import ray

    from vpd_ray.config import worker_range

    if requested:
        return requested
    total = ray.cluster_resources()
    per_worker = dict(base.scaling.resources_per_worker)
    workers = worker_range(base)[1]
    if base.scaling.use_gpu:
        return max(1, int(total.get("GPU", 0) // (workers * per_worker.get("GPU", 1))))
    return max(1, int(total.get("CPU", 1) // (workers * per_worker.get("CPU", 1) + TRIAL_DRIVER_CPU)))


def build_tuner(sweep: DictConfig, base: DictConfig):
    """A fresh Tuner, or the interrupted one restored from ``<storage_path>/<name>``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from vpd_ray.sweep.config import metric_and_mode, reports_per_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": TRIAL_DRIVER_CPU})
    path = os.path.join(sweep.storage_path, sweep.name)
    if tune.Tuner.can_restore(path):
        print(f"[vpd] resuming the sweep at {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = metric_and_mode(sweep, base)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports_per_trial(sweep, base),
                              grace_period=sweep.asha.grace_period, reduction_factor=sweep.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=space.build_param_space(sweep.search_space),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, scheduler=scheduler, num_samples=sweep.num_samples,
            # the limit goes to the generator: Tune ignores max_concurrent_trials next to a search_alg
            search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                             max_concurrent=max_concurrent_trials(base, sweep.max_concurrent_trials)),
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )  # fmt: skip


def write_outputs(sweep: DictConfig, base: DictConfig, result_grid: Any) -> dict[str, Any]:
    """The trial table, plot, best YAML and best package; returns the best trial's row."""
    from vpd_ray.config import load, to_yaml
    from vpd_ray.engine.checkpoint import export_checkpoint
    from vpd_ray.paths import EVERY_PATH
    from vpd_ray.sweep.config import metric_and_mode, reports_per_trial

    out = os.path.join(sweep.storage_path, sweep.name)
    metric, mode = metric_and_mode(sweep, base)
    keys = list(sweep.search_space)
    rows = results.trial_rows(result_grid, keys, metric, mode, reports_per_trial(sweep, base))
    best = results.pick_best(rows, metric, mode)
    results.write_csv(rows, os.path.join(out, "trials.csv"))
    with open(os.path.join(out, "trials.md"), "w") as f:
        f.write(results.markdown_table(rows, metric, mode))
    x_key = keys[0]
    results.plot_trials(rows, metric, x_key, keys[1] if len(keys) > 1 else None, os.path.join(out, "trials.png"),
                        log_x="loguniform" in space.to_plain(sweep.search_space[x_key]))
    best_overrides = [*sweep.overrides, *(space.format_override(k, best[k]) for k in keys),
                      space.format_override("run.name", f"{sweep.name}-best")]
    with open(os.path.join(out, "best.yaml"), "w") as f:
        f.write(f"# best of sweep {sweep.name}: trial {best['trial_id']}, {metric} = {best[metric]:.6g}\n")
        f.write(to_yaml(load(sweep.train_config, best_overrides, remote=EVERY_PATH)))
    export_checkpoint(os.path.join(out, TRIALS_DIR, best["trial_id"]), os.path.join(out, "best_package"))
    return best
