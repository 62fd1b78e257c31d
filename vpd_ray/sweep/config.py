"""The sweep configuration (``configs/tune_*.yaml``): which training config, what to vary, how to stop.

A sweep file names a training config and never repeats it; each trial is that config plus the
sweep's ``overrides`` plus its sampled values, validated by :mod:`vpd_ray.config` like any run.
Field names are permanent YAML keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vpd_ray.config import ConfigError, _one_line


@dataclasses.dataclass
class AshaConfig:
    """ASHA early stopping; time is counted in validation reports (one per ``train.val_every`` steps)."""

    max_t: Optional[int] = None  # reports of a full trial; None: ceil(train.max_steps / train.val_every)
    grace_period: int = 1  # reports every trial gets before it can be stopped
    reduction_factor: int = 2  # 1/reduction_factor of the trials go on at each rung


@dataclasses.dataclass
class SweepConfig:
    train_config: str = "???"  # the training YAML every trial starts from
    overrides: List[str] = dataclasses.field(default_factory=list)  # key=value for every trial
    search_space: Dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> {sampler: args}
    num_samples: int = 8  # trials (each grid_search value multiplies this)
    metric: Optional[str] = None  # "<task>/<metric>"; None: the training config's checkpoint metric
    mode: Optional[str] = None  # "min" | "max"; None: the task's
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    max_concurrent_trials: Optional[int] = None  # None: as many as the cluster's CPUs/GPUs hold at once
    name: str = "tune"
    storage_path: str = "~/vpd_runs"  # the sweep lives in <storage_path>/<name>
    seed: int = 0  # sampling of the search space


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig))


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """CLI ``key=value`` pairs -> (sweep overrides, training overrides), by the key's first part."""
    sweep, train = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        (sweep if item.split("=", 1)[0].split(".")[0] in SWEEP_KEYS else train).append(item)
    return sweep, train


def load_sweep(path: str, overrides: list[str] = ()) -> DictConfig:
    """Schema <- YAML <- CLI overrides; CLI keys that are not sweep keys extend ``overrides``.

    Composes the training config (with the sweep's overrides) and checks that every swept key exists
    in it, so a typo fails here in one line, not in every trial; ``vpd_ray.tune`` validates it.
    """
    from vpd_ray import config as train_config

    if not os.path.isfile(path):
        raise ConfigError(f"sweep config not found: {path}")
    sweep_overrides, train_overrides = split_overrides(list(overrides))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path),
                              OmegaConf.from_dotlist(sweep_overrides))
        cfg.overrides = list(cfg.overrides) + train_overrides
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    if OmegaConf.is_missing(cfg, "train_config"):
        raise ConfigError("train_config: required (the training YAML every trial starts from)")
    cfg.storage_path = os.path.abspath(os.path.expanduser(cfg.storage_path))
    cfg.train_config = os.path.abspath(cfg.train_config)
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples: {cfg.num_samples} must be >= 1")
    if cfg.mode is not None and cfg.mode not in ("min", "max"):
        raise ConfigError(f"mode: {cfg.mode!r} is not one of min, max")
    base = train_config.compose(cfg.train_config, list(cfg.overrides))  # paths: checked by the launch
    for key in cfg.search_space:
        if OmegaConf.select(base, key, default="<absent>") == "<absent>":
            raise ConfigError(f"search_space.{key}: no such key in {cfg.train_config}")
    return cfg


def metric_and_mode(sweep: DictConfig, base: DictConfig) -> tuple[str, str]:
    """The metric ASHA and the best-trial pick use: the sweep's, else the training run's own."""
    from vpd_ray.config import task_metric

    metric, mode = task_metric(base)
    return sweep.metric or metric, sweep.mode or mode


def reports_per_trial(sweep: DictConfig, base: DictConfig) -> int:
    """ASHA's ``max_t``: the training loop validates (and reports) every ``val_every`` steps and at the end."""
    return sweep.asha.max_t or math.ceil(base.train.max_steps / base.train.val_every)
