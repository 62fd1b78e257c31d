"""The run configuration: a typed schema, YAML files, ``key=value`` overrides and validation.

Every field name below is a permanent YAML key (``train.lr``, ``deepspeed.zero_stage``, ...): runs,
checkpoints and model packages store the resolved config, so a renamed key breaks them. The
per-task sections (``tasks.<name>``) are typed by each registered task's ``config_class`` and the
backbone section by ``BackboneConfig``, so this module never repeats their fields.

Everything is checked here, on the driver, before a single Ray worker starts: an unknown key, a
wrong type, a missing shard or weight file is one line on stderr and exit code 2
(:func:`load_or_exit`), never a stack trace from a worker ten minutes later.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vpd_ray.model.backbone import BackboneConfig

EXIT_CONFIG_ERROR = 2
SCHEDULE_KINDS = ("constant", "poly_rise_fall", "warmup_poly")
NAN_POLICIES = ("skip", "stop")
METRIC_MODES = ("min", "max")
SHARD_KEYS = ("train_shards", "val_shards", "test_shards")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the key and the bad value."""


@dataclasses.dataclass
class ModelConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule as a factor of ``train.lr`` (every param group follows it).

    ``poly_rise_fall`` (VPD depth): from ``min_lr`` up to ``lr`` as ``t**power`` over the first
    ``peak_fraction`` of the steps, then back down the same way. ``warmup_poly`` (VPD segmentation):
    linear warm-up from ``warmup_ratio * lr`` over ``warmup_steps``, then ``(1 - t)**power`` decay
    to ``min_lr``.
    """

    kind: str = "constant"
    power: float = 1.0
    min_lr: float = 0.0
    peak_fraction: float = 0.5
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6


@dataclasses.dataclass
class CheckpointConfig:
    """A checkpoint is written after every validation; the best ``keep`` by ``metric`` survive."""

    keep: int = 2
    metric: Optional[str] = None  # "<task>/<metric>"; default: the first task's primary metric
    mode: Optional[str] = None  # "min" | "max"; default: that task's metric_mode


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    # Samples per optimizer step over all workers; gradient accumulation is derived from it so the
    # reference global batch (24 for VPD depth) is reachable on any worker count. None: no accumulation.
    global_batch_size: Optional[int] = None
    lr: float = 5e-4
    weight_decay: float = 0.1
    unet_lr_mult: float = 0.01  # UNet parameters train at this multiple of lr (VPD: 0.01 depth, 0.1 seg)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    grad_checkpointing: bool = False  # UNet activation checkpointing (reentrant: safe under ZeRO-3)
    log_every: int = 10
    val_every: int = 500
    max_val_batches: Optional[int] = None  # cap on validation batches per worker; None: the whole split
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    nan_policy: str = "skip"  # "skip": drop the batch and draw another; "stop": fail naming the step
    max_nan_skips: int = 10  # more skipped batches than this in one run stops it


@dataclasses.dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    bf16: bool = True


@dataclasses.dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    num_workers: int = 2  # data-loader processes per training worker
    shuffle_buffer: int = 1000
    max_corrupt: int = 0  # undecodable samples tolerated per stream before it fails


@dataclasses.dataclass
class RunConfig:
    name: str = "vpd"
    storage_path: str = "~/vpd_runs"  # local (made absolute) or a cloud URI; the run is <storage_path>/<name>
    seed: int = 0
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    export: bool = True  # write a model package to <storage_path>/<name>/package at the end


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tasks: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def _one_line(err: Exception) -> str:
    """omegaconf messages are multi-line (key, object type); keep the value and the full key."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key and key not in first else first


def _type_tasks(cfg: DictConfig) -> None:
    """Replace each raw ``tasks.<name>`` section by one typed by that task's ``config_class``."""
    from vpd_ray.tasks import get_task

    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is required (e.g. tasks.depth)")
    for name in list(cfg.tasks):
        try:
            task_cls = get_task(name)
        except KeyError as err:
            raise ConfigError(f"tasks.{name}: {err.args[0]}") from None
        section = cfg.tasks[name] if cfg.tasks[name] is not None else {}
        try:
            cfg.tasks[name] = OmegaConf.merge(OmegaConf.structured(task_cls.config_class), section)
        except OmegaConfBaseException as err:
            raise ConfigError(f"tasks.{name}.{_one_line(err)}") from None


def compose(path: Optional[str] = None, overrides: List[str] = (), base: Optional[dict] = None) -> DictConfig:
    """Schema defaults <- YAML file (or ``base``, a plain dict) <- ``key=value`` overrides, typed.

    Raises ConfigError.
    """
    try:
        cfg = OmegaConf.structured(Config)
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    _type_tasks(cfg)
    if _is_local(cfg.run.storage_path):
        cfg.run.storage_path = os.path.abspath(os.path.expanduser(cfg.run.storage_path))
    for task in cfg.tasks.values():
        for key in SHARD_KEYS:
            if task[key] is not None:
                task[key] = _absolute_shards(task[key])
    return cfg


def _absolute_shards(spec: str) -> str:
    """Local shard paths made absolute on the driver, so workers need not share its working directory."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(os.path.abspath(os.path.expanduser(p)) if _is_local(p) else p for p in parts)


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_positive(key: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: {value!r} must be >= {minimum}")


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of a brace pattern or comma list (``a-{000..003}.tar,b.tar``)."""
    import braceexpand

    return [url for part in spec.split(",") if part.strip() for url in braceexpand.braceexpand(part.strip())]


def _is_local(url: str) -> bool:
    """A path on this machine's filesystem (not s3://, gs://, pipe:...)."""
    return "://" not in url and not url.startswith("pipe:")


def local_run_dir(cfg: DictConfig) -> str:
    """Where this machine writes run-side files (TensorBoard, events.log, the package): the run
    directory itself when the storage is local, else ``~/vpd_runs/<name>`` on the node."""
    if _is_local(cfg.run.storage_path):
        return os.path.join(cfg.run.storage_path, cfg.run.name)
    return os.path.join(os.path.expanduser("~/vpd_runs"), cfg.run.name)


def _check_shards(key: str, spec: Optional[str]) -> None:
    if spec is None:
        return
    urls = expand_urls(spec)
    if not urls:
        raise ConfigError(f"{key}: {spec!r} names no shards")
    missing = [u for u in urls if _is_local(u) and not os.path.exists(os.path.expanduser(u))]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of {len(urls)} shards not found, first: {missing[0]}")


def _looks_like_path(value: str) -> bool:
    """A hub id is ``owner/name``; anything else (absolute, ./, ~, deeper, a file suffix) is a path."""
    if value.startswith(("/", ".", "~")) or value.count("/") != 1:
        return True
    return value.endswith(WEIGHT_SUFFIXES)


def _check_backbone(backbone: DictConfig) -> None:
    """BackboneConfig's own checks, then: its weight paths that are not hub ids must exist."""
    try:
        BackboneConfig(**OmegaConf.to_container(backbone, resolve=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.backbone: {err}") from None
    for key in ("path", "config_path"):
        value = backbone.get(key)
        if isinstance(value, str) and _looks_like_path(value) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"model.backbone.{key}: path not found: {value}")


def _check_task_files(name: str, section: DictConfig) -> None:
    """String options of a task that name weight files (class embeddings, ...) must exist."""
    for key, value in section.items():
        if isinstance(value, str) and value.endswith(WEIGHT_SUFFIXES) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"tasks.{name}.{key}: file not found: {value}")


def task_metric(cfg: DictConfig) -> tuple[str, str]:
    """The checkpoint-selection metric (``<task>/<metric>``) and its mode (``min``/``max``)."""
    from vpd_ray.tasks import get_task

    first = get_task(next(iter(cfg.tasks)))
    metric = cfg.train.checkpoint.metric or f"{first.name}/{first.primary_metric}"
    return metric, cfg.train.checkpoint.mode or first.metric_mode


def grad_accum_steps(cfg: DictConfig) -> int:
    """Micro-batches accumulated per optimizer step so that the global batch is ``global_batch_size``.

    Every task must reach the same accumulation count, since DeepSpeed has one.
    """
    workers = cfg.scaling.num_workers
    counts = set()
    for name, task in cfg.tasks.items():
        per_step = task.batch_size * workers
        if cfg.train.global_batch_size is None:
            counts.add(1)
        elif cfg.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by "
                f"tasks.{name}.batch_size x scaling.num_workers = {task.batch_size} x {workers}"
            )
        else:
            counts.add(cfg.train.global_batch_size // per_step)
    if len(counts) != 1:
        raise ConfigError(f"train.global_batch_size: tasks need different accumulation counts {sorted(counts)}")
    return counts.pop()


def validate(cfg: DictConfig, need: tuple[str, ...] = ("train_shards", "val_shards")) -> None:
    """Value checks the schema's types cannot express; raises ConfigError naming the key."""
    t = cfg.train
    _check_positive("train.max_steps", t.max_steps)
    _check_positive("train.log_every", t.log_every)
    _check_positive("train.val_every", t.val_every)
    _check_positive("train.checkpoint.keep", t.checkpoint.keep)
    _check_positive("train.max_nan_skips", t.max_nan_skips, 0)
    _check_choice("train.schedule.kind", t.schedule.kind, SCHEDULE_KINDS)
    _check_choice("train.nan_policy", t.nan_policy, NAN_POLICIES)
    if t.checkpoint.mode is not None:
        _check_choice("train.checkpoint.mode", t.checkpoint.mode, METRIC_MODES)
    if not 0.0 < t.schedule.peak_fraction <= 1.0:
        raise ConfigError(f"train.schedule.peak_fraction: {t.schedule.peak_fraction} must be in (0, 1]")
    _check_choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3))
    _check_positive("scaling.num_workers", cfg.scaling.num_workers)
    _check_positive("data.num_workers", cfg.data.num_workers, 0)
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name: {cfg.run.name!r} must be a non-empty name without '/'")
    for name, task in cfg.tasks.items():
        _check_positive(f"tasks.{name}.batch_size", task.batch_size)
        for field in need:
            if task[field] is None:
                raise ConfigError(f"tasks.{name}.{field}: required")
            _check_shards(f"tasks.{name}.{field}", task[field])
    if t.grad_checkpointing and cfg.deepspeed.zero_stage == 3:
        # VPD.md: non-reentrant recompute (the backbone's) of a diffusers UNet with frozen partitioned
        # parameters crashes under ZeRO-3.
        raise ConfigError("train.grad_checkpointing: not supported with deepspeed.zero_stage 3; use zero_stage 2")
    grad_accum_steps(cfg)
    _check_backbone(cfg.model.backbone)
    for name, task in cfg.tasks.items():
        _check_task_files(name, task)


def load(path: Optional[str], overrides: List[str] = (), need: tuple[str, ...] = ("train_shards", "val_shards")) -> DictConfig:
    """Compose and validate; raises ConfigError."""
    cfg = compose(path, overrides)
    validate(cfg, need)
    return cfg


def load_or_exit(path: Optional[str], overrides: List[str] = (), need: tuple[str, ...] = ("train_shards", "val_shards")) -> DictConfig:
    """The entry points' loader: a bad config is one line on stderr and exit code 2."""
    try:
        return load(path, overrides, need)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_container(data: dict) -> DictConfig:
    """Re-type a resolved config passed as a plain dict (``train_loop_config``), without path checks."""
    return compose(base=data)
