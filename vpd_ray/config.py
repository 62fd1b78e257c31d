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
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vpd_ray.batching import LR_SCALINGS, BatchPlan
from vpd_ray.errors import InputError, first_line
from vpd_ray.model.backbone import BackboneConfig
from vpd_ray.data.tario import is_local, local_path
from vpd_ray.paths import SHARD_KEYS, PathCheck, config_paths, is_remote, problem

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
SCHEDULE_KINDS = ("constant", "poly_rise_fall", "warmup_poly")
NAN_POLICIES = ("skip", "stop")
RESUME_POLICIES = ("auto", "never", "must")
DTYPES = ("fp32", "bf16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
METRIC_MODES = ("min", "max")
TRAIN_NEEDS = ("train_shards", "val_shards")


class ConfigError(InputError, ValueError):
    """A bad configuration; the message is one line that names the key and the bad value."""


@dataclasses.dataclass
class ModelSection:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    # The frozen VAE encoder's dtype in training: "fp32" (the reference) or "bf16" (about half its time
    # and memory on a GPU; `python -m vpd_ray.bench gpu` prints the latent error against fp32)
    vae_dtype: str = "fp32"


@dataclasses.dataclass
class ScheduleSection:
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
class CheckpointSection:
    """A checkpoint is written after every validation; the best ``keep`` by ``metric`` survive."""

    keep: int = 2
    metric: Optional[str] = None  # "<task>/<metric>"; default: the first task's primary metric
    mode: Optional[str] = None  # "min" | "max"; default: that task's metric_mode
    # Light weights-only checkpoints (a model package with the bf16 training weights, about a sixth
    # of a full checkpoint) every this many steps between the full ones, in <run dir>/weights/; 0: off.
    weights_every: int = 0
    weights_keep: int = 2  # the latest this many weights-only checkpoints are kept


@dataclasses.dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps
    # Samples per optimizer step over all workers. The micro-batch (at most tasks.<name>.batch_size)
    # and the accumulation are derived so that it is kept wherever the worker count allows; else the
    # nearest reachable batch is used and lr scaled by lr_scaling (vpd_ray.batching). None: no accumulation.
    global_batch_size: Optional[int] = None
    lr_scaling: str = "linear"  # "none" | "linear" | "sqrt": lr x (actual / configured global batch)**{0,1,1/2}
    lr: float = 5e-4
    weight_decay: float = 0.1
    unet_lr_mult: float = 0.01  # UNet parameters train at this multiple of lr (VPD: 0.01 depth, 0.1 seg)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    grad_checkpointing: bool = False  # UNet activation checkpointing (reentrant: safe under ZeRO-3)
    # Speed options (docs/benchmarks.md); each can be turned off for a fidelity run
    tf32: bool = True  # CUDA: TF32 for the fp32 matmuls and convolutions (the fp32 VAE); no effect on CPU
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its convolution algorithms once for the fixed crop
    channels_last: bool = False  # NHWC model and images (convolutions of tensor-core kernels want it)
    compile: bool = False  # torch.compile the UNet in place (state-dict keys unchanged); the first steps compile
    log_every: int = 10
    val_every: int = 500
    max_val_batches: Optional[int] = None  # cap on validation batches per worker; None: the whole split
    # Validation samples drawn into TensorBoard per task at every validation (rank 0's first ones: the
    # same samples each time, so progress is visible); 0: none
    log_images: int = 4
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    nan_policy: str = "skip"  # "skip": drop the batch and draw another; "stop": fail naming the step
    max_nan_skips: int = 10  # more skipped batches than this in one run stops it
    # EMA of the trainable weights after every optimizer step, ema = d * ema + (1 - d) * weight, kept in
    # fp32 and in every full checkpoint (vpd_ray.engine.ema); in [0, 1), 0: off (VPD); ZeRO-0/1/2 only
    ema_decay: float = 0.0
    ema_eval: bool = False  # validation, the exported package and weights-only checkpoints use the EMA weights


@dataclasses.dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    bf16: bool = True
    # ZeRO's gradient communication; the defaults are DeepSpeed's own
    overlap_comm: bool = False  # reduce-scatter gradient buckets while the backward pass runs
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduce-scatter
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather (ZeRO-1/2)
    # "fp32" | "bf16" gradient accumulation (ZeRO-1 and ZeRO-3; DeepSpeed's ZeRO-2 accumulates in the
    # parameter dtype); None: DeepSpeed's default, the parameter dtype
    grad_accum_dtype: Optional[str] = None


@dataclasses.dataclass
class ScalingSection:
    # Training workers (GPUs): N, or [min, max] for an elastic run: Ray Train starts with as many as the
    # cluster fits (at least min), restarts the group from the latest checkpoint when a node is lost
    # and grows it again when nodes join; the batch plan is recomputed from the real count each time.
    num_workers: Any = 1
    use_gpu: bool = False
    resources_per_worker: Dict[str, float] = dataclasses.field(default_factory=dict)
    placement_strategy: str = "PACK"  # Ray's: PACK (fill a node first), SPREAD, STRICT_PACK, STRICT_SPREAD
    elastic_resize_monitor_interval_s: float = 60.0  # elastic runs: how often Ray Train looks for more room


@dataclasses.dataclass
class DataSection:
    num_workers: int = 2  # data-loader processes per training worker
    shuffle_buffer: int = 1000
    max_corrupt: int = 0  # undecodable samples tolerated per stream before it fails
    # Where train JPEGs are decoded: "loader" (the DataLoader workers) or "device" (the training device after
    # the copy: nvJPEG through torchvision on a GPU, the training process on a CPU run; vpd_ray.data.device_decode)
    jpeg_decode: str = "loader"


@dataclasses.dataclass
class RunSection:
    name: str = "vpd"
    storage_path: str = "~/vpd_runs"  # local (made absolute) or a cloud URI; the run is <storage_path>/<name>
    seed: int = 0
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    export: bool = True  # write a model package to <storage_path>/<name>/package at the end
    # "auto": resume the run's latest checkpoint if it has one (a finished run: one line, nothing done);
    # "never": refuse a run name that has checkpoints; "must": refuse one that has none
    resume: str = "auto"
    # Ray's and Ray Train's own console lines (worker logs, per-checkpoint reports, tracebacks); off,
    # the console holds the run's progress lines and one line per error, and the rest is in the run's logs
    verbose: bool = False


@dataclasses.dataclass
class Config:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tasks: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)


def _one_line(err: Exception) -> str:
    """omegaconf messages are multi-line (key, object type); keep the value and the full key."""
    first = first_line(err)
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key and key not in first else first


def _type_tasks(cfg: DictConfig) -> None:
    """Replace each raw ``tasks.<name>`` section by one typed by that task's ``config_class``; old key
    names are upgraded first (``TaskConfig.upgrade``), with a one-line notice each."""
    from vpd_ray.tasks import get_task

    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is required (e.g. tasks.depth)")
    for name in list(cfg.tasks):
        try:
            task_cls = get_task(name)
        except KeyError as err:
            raise ConfigError(f"tasks.{name}: {err.args[0]}") from None
        raw = OmegaConf.to_container(cfg.tasks[name]) if cfg.tasks[name] is not None else {}
        for notice in task_cls.config_class.upgrade(raw):
            log.warning(f"config notice: tasks.{name}.{notice}")
        try:
            cfg.tasks[name] = OmegaConf.merge(OmegaConf.structured(task_cls.config_class), raw)
        except OmegaConfBaseException as err:
            raise ConfigError(f"tasks.{name}.{_one_line(err)}") from None


def task_config(name: str, section: DictConfig) -> Any:
    """The typed options object (``TaskConfig`` subclass) of ``tasks.<name>``: the one conversion that
    validation on the driver and model building share, so the task's own value checks
    (``__post_init__``) run before any Ray worker starts. Raises ConfigError."""
    try:
        return OmegaConf.to_object(section)
    except (ValueError, TypeError) as err:
        message = first_line(err)
        raise ConfigError(message if message.startswith(f"tasks.{name}") else f"tasks.{name}: {message}") from None


def compose(path: Optional[str] = None, overrides: List[str] = (), base: Optional[dict] = None) -> DictConfig:
    """Schema defaults <- YAML file (or ``base``, a plain dict) <- ``key=value`` overrides, typed.

    Raises ConfigError.
    """
    try:
        cfg = OmegaConf.structured(Config)
        if path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml(path))
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    _type_tasks(cfg)
    if is_local(cfg.run.storage_path):
        cfg.run.storage_path = os.path.abspath(os.path.expanduser(local_path(cfg.run.storage_path)))
    for task in cfg.tasks.values():
        for key in SHARD_KEYS:
            if task[key] is not None:
                task[key] = _absolute_shards(task[key])
    return cfg


def _read_yaml(path: str) -> DictConfig:
    """The YAML file at ``path``; a missing file or a syntax error is one line naming file and line."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or first_line(err)}") from None


def _absolute_shards(spec: str) -> str:
    """Local shard paths made absolute on the driver, so workers need not share its working directory."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(os.path.abspath(os.path.expanduser(local_path(p))) if is_local(p) else p for p in parts)


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_positive(key: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: {value!r} must be >= {minimum}")


def _check_above(key: str, value: float, bound: float = 0.0) -> None:
    if not value > bound:
        raise ConfigError(f"{key}: {value!r} must be > {bound}")


def _check_jpeg_decode(cfg: DictConfig) -> None:
    """``data.jpeg_decode: device`` needs tasks whose transforms can leave the image encoded, and on GPU
    workers torchvision (its nvJPEG decode)."""
    import importlib.util

    from vpd_ray.data.device_decode import JPEG_DECODES
    from vpd_ray.tasks import get_task

    _check_choice("data.jpeg_decode", cfg.data.jpeg_decode, JPEG_DECODES)
    if cfg.data.jpeg_decode != "device":
        return
    loader_only = [name for name in cfg.tasks if not get_task(name).decodes_jpeg_on_device]
    if loader_only:
        raise ConfigError(f"data.jpeg_decode: device is not supported by task(s) {', '.join(loader_only)}, whose "
                          "transforms need the decoded image; use data.jpeg_decode=loader")
    if cfg.scaling.use_gpu and importlib.util.find_spec("torchvision") is None:
        raise ConfigError("data.jpeg_decode: device decodes with torchvision.io.decode_jpeg on GPU workers; "
                          "install torchvision built for the installed torch, or use data.jpeg_decode=loader")


def local_run_dir(cfg: DictConfig) -> str:
    """Where this machine writes run-side files (TensorBoard, events.log, the package): the run
    directory itself when the storage is local, else ``~/vpd_runs/<name>`` on the node."""
    if is_local(cfg.run.storage_path):
        return os.path.join(cfg.run.storage_path, cfg.run.name)
    return os.path.join(os.path.expanduser("~/vpd_runs"), cfg.run.name)


def _check_backbone(backbone: DictConfig) -> None:
    """BackboneConfig's own checks (its weights are path checks, :mod:`vpd_ray.paths`)."""
    try:
        BackboneConfig(**OmegaConf.to_container(backbone, resolve=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.backbone: {err}") from None


def _check_paths(cfg: DictConfig, need: tuple[str, ...], remote: tuple[str, ...]) -> None:
    """Every path and hub id the driver can see; the ones :func:`vpd_ray.paths.is_remote` marks are
    left to :func:`deferred_checks` (checked on a worker node before training starts)."""
    for check in config_paths(cfg, need):
        if not is_remote(check, remote):
            found = problem(check)
            if found:
                raise ConfigError(found)


def deferred_checks(cfg: DictConfig, need: tuple[str, ...] = TRAIN_NEEDS, remote: tuple[str, ...] = ()) -> list[PathCheck]:
    """The path checks :func:`validate` left for a worker node (cloud URLs, ``--remote-check`` paths)."""
    return [c for c in config_paths(cfg, need) if is_remote(c, remote)]


def task_metric(cfg: DictConfig) -> tuple[str, str]:
    """The checkpoint-selection metric (``<task>/<metric>``) and its mode (``min``/``max``)."""
    from vpd_ray.tasks import get_task

    first = get_task(next(iter(cfg.tasks)))
    metric = cfg.train.checkpoint.metric or f"{first.name}/{first.primary_metric}"
    return metric, cfg.train.checkpoint.mode or first.metric_mode


def worker_range(cfg: DictConfig) -> tuple[int, int]:
    """``(min, max)`` training workers of ``scaling.num_workers`` (N: ``(N, N)``); raises ConfigError."""
    value = cfg.scaling.num_workers
    counts = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    if len(counts) == 1:
        counts *= 2
    if len(counts) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in counts) \
            or not 1 <= counts[0] <= counts[1]:
        raise ConfigError(f"scaling.num_workers: {OmegaConf.to_container(value) if OmegaConf.is_list(value) else value!r} "
                          "must be a count >= 1 or [min, max] with 1 <= min <= max")
    return counts[0], counts[1]


def batch_plan(cfg: DictConfig, workers: Optional[int] = None) -> BatchPlan:
    """Micro-batch, accumulation and scaled LR on ``workers`` (default: the most ``scaling.num_workers`` allows); see
    :mod:`vpd_ray.batching`. Workers call it with their real world size."""
    from vpd_ray.batching import plan_batches

    caps = {name: task.batch_size for name, task in cfg.tasks.items()}
    return plan_batches(caps, workers or worker_range(cfg)[1], cfg.train.global_batch_size, cfg.train.lr,
                        cfg.train.lr_scaling)


def validate(cfg: DictConfig, need: tuple[str, ...] = TRAIN_NEEDS, remote: tuple[str, ...] = ()) -> None:
    """Value checks the schema's types cannot express, then the paths this machine can see (``remote``:
    path prefixes checked on a worker node instead, see :mod:`vpd_ray.paths`); raises ConfigError."""
    t = cfg.train
    _check_positive("train.max_steps", t.max_steps)
    _check_positive("train.log_every", t.log_every)
    _check_positive("train.val_every", t.val_every)
    _check_positive("train.checkpoint.keep", t.checkpoint.keep)
    _check_positive("train.max_nan_skips", t.max_nan_skips, 0)
    _check_positive("train.log_images", t.log_images, 0)
    _check_choice("train.schedule.kind", t.schedule.kind, SCHEDULE_KINDS)
    _check_choice("train.nan_policy", t.nan_policy, NAN_POLICIES)
    _check_choice("train.lr_scaling", t.lr_scaling, LR_SCALINGS)
    _check_choice("run.resume", cfg.run.resume, RESUME_POLICIES)
    _check_above("train.lr", t.lr)
    _check_above("train.schedule.power", t.schedule.power)
    for key in ("weight_decay", "unet_lr_mult", "grad_clip"):
        _check_positive(f"train.{key}", t[key], 0)
    _check_positive("train.schedule.min_lr", t.schedule.min_lr, 0)
    _check_positive("train.schedule.warmup_steps", t.schedule.warmup_steps, 0)
    _check_positive("data.shuffle_buffer", cfg.data.shuffle_buffer, 0)
    _check_positive("data.max_corrupt", cfg.data.max_corrupt, 0)
    _check_positive("run.max_failures", cfg.run.max_failures, -1)
    _check_positive("train.checkpoint.weights_every", t.checkpoint.weights_every, 0)
    _check_positive("train.checkpoint.weights_keep", t.checkpoint.weights_keep)
    if t.global_batch_size is not None:
        _check_positive("train.global_batch_size", t.global_batch_size)
    if t.checkpoint.mode is not None:
        _check_choice("train.checkpoint.mode", t.checkpoint.mode, METRIC_MODES)
    if not 0.0 < t.schedule.peak_fraction <= 1.0:
        raise ConfigError(f"train.schedule.peak_fraction: {t.schedule.peak_fraction} must be in (0, 1]")
    _check_choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3))
    _check_choice("model.vae_dtype", cfg.model.vae_dtype, DTYPES)
    if cfg.deepspeed.grad_accum_dtype is not None:
        _check_choice("deepspeed.grad_accum_dtype", cfg.deepspeed.grad_accum_dtype, DTYPES)
        if cfg.deepspeed.zero_stage in (0, 2):  # a silently ignored option would read as a fidelity setting
            raise ConfigError(f"deepspeed.grad_accum_dtype: DeepSpeed applies it with zero_stage 1 or 3 only "
                              f"(stage {cfg.deepspeed.zero_stage} accumulates in the parameter dtype)")
    _check_positive("deepspeed.reduce_bucket_size", cfg.deepspeed.reduce_bucket_size)
    _check_positive("deepspeed.allgather_bucket_size", cfg.deepspeed.allgather_bucket_size)
    worker_range(cfg)  # an int >= 1 or [min, max] with 1 <= min <= max
    _check_choice("scaling.placement_strategy", cfg.scaling.placement_strategy, PLACEMENT_STRATEGIES)
    _check_above("scaling.elastic_resize_monitor_interval_s", cfg.scaling.elastic_resize_monitor_interval_s)
    _check_positive("data.num_workers", cfg.data.num_workers, 0)
    _check_jpeg_decode(cfg)
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name: {cfg.run.name!r} must be a non-empty name without '/'")
    for name, task in cfg.tasks.items():
        task_config(name, task)
        _check_positive(f"tasks.{name}.batch_size", task.batch_size)
        _check_positive(f"tasks.{name}.eval_batch_size", task.eval_batch_size)
        _check_positive(f"tasks.{name}.loss_weight", task.loss_weight, 0)
        _check_above(f"tasks.{name}.batch_share", task.batch_share)
        for field in need:
            if task[field] is None:
                raise ConfigError(f"tasks.{name}.{field}: required")
    if t.grad_checkpointing and cfg.deepspeed.zero_stage == 3:
        # VPD.md: non-reentrant recompute (the backbone's) of a diffusers UNet with frozen partitioned
        # parameters crashes under ZeRO-3.
        raise ConfigError("train.grad_checkpointing: not supported with deepspeed.zero_stage 3; use zero_stage 2")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: {t.ema_decay!r} must be in [0, 1) (0: no EMA)")
    if t.ema_eval and t.ema_decay == 0:
        raise ConfigError("train.ema_eval: true needs train.ema_decay > 0 (with 0 no EMA of the weights is kept)")
    if t.ema_decay > 0 and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.ema_decay: not supported with deepspeed.zero_stage 3 (every rank keeps a full fp32 "
                          "EMA of the replicated weights, which ZeRO-3 partitions); use zero_stage 2")
    if t.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.compile: not supported with deepspeed.zero_stage 3 (ZeRO-3 gathers each layer's "
                          "parameters in module hooks, which the compiled graph would bake in); use zero_stage 2")
    _check_backbone(cfg.model.backbone)
    _check_paths(cfg, need, remote)


def load(path: Optional[str], overrides: List[str] = (), need: tuple[str, ...] = TRAIN_NEEDS,
         remote: tuple[str, ...] = ()) -> DictConfig:
    """Compose and validate; raises ConfigError."""
    cfg = compose(path, overrides)
    validate(cfg, need, remote)
    return cfg


def exit_config_error(message: str) -> None:
    """The one line and exit code 2 of every bad configuration."""
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def load_or_exit(path: Optional[str], overrides: List[str] = (), need: tuple[str, ...] = TRAIN_NEEDS,
                 remote: tuple[str, ...] = ()) -> DictConfig:
    """The entry points' loader: a bad config is one line on stderr and exit code 2."""
    try:
        return load(path, overrides, need, remote)
    except ConfigError as err:
        exit_config_error(str(err))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_container(data: dict) -> DictConfig:
    """Re-type a resolved config passed as a plain dict (``train_loop_config``), without path checks."""
    return compose(base=data)
