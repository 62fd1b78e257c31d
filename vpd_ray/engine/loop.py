"""The function every Ray Train worker runs: setup (Ray context, model, DeepSpeed engine), then the
run: steps by :class:`vpd_ray.engine.step.Stepper`, validation, checkpoints.

Everything arrives in ``loop_config`` (``{"config": resolved config as a dict, ...}``); no globals.
The frozen VAE is detached from the module DeepSpeed wraps (:func:`detach_vae`) so it is neither
optimised nor partitioned by ZeRO-3; it runs ``backbone.encode`` in ``model.vae_dtype`` (fp32 by
default) before the engine. Speed options: :mod:`vpd_ray.engine.speed`.

Collective discipline (a rank that skips one hangs the others): every rank runs the same steps, picks
the same task per micro-batch (the stepper's draw), agrees on NaN skips with an all-reduce,
evaluates in lockstep and calls ``ray.train.report`` at the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from vpd_ray.engine import checkpoint as ckpt
from vpd_ray.engine import ema, speed
from vpd_ray.engine.console import append_event, say, started
from vpd_ray.engine.evaluation import evaluate_task
from vpd_ray.engine.optim import deepspeed_config, lr_factor, param_groups
from vpd_ray.engine.step import Stepper, float_outputs
from vpd_ray.paths import human_bytes

# Progress goes through logging, not print: Ray Train's worker print patch both tees print to the
# worker's stdout and logs it, so every printed line reached the driver twice.
log = logging.getLogger(__name__)



def detach_vae(model: torch.nn.Module) -> torch.nn.Module:
    """Unregister ``model.backbone.vae`` but keep it reachable as a plain attribute.

    ``backbone.encode`` still finds ``self.vae``; ``parameters()``/``state_dict()`` no longer see it,
    so DeepSpeed neither optimises, casts, nor (ZeRO-3) partitions the frozen VAE.
    """
    backbone = model.backbone
    vae = backbone._modules.pop("vae")
    object.__setattr__(backbone, "vae", vae)
    return vae


def _all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=op)
    return value


@dataclasses.dataclass
class RunState:
    """What a checkpoint restores besides DeepSpeed's state."""

    step: int = 0
    # per task: where its train stream stands, at sample level (DataPosition.to_dict, merged over ranks)
    data: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    nan_skips: int = 0


class Trainer:
    """One worker's training run; built from the resolved config, driven by :meth:`run`."""

    def __init__(self, cfg: DictConfig, loop_config: dict[str, Any]):
        import deepspeed
        import ray.train
        import ray.train.torch

        from vpd_ray.config import batch_plan, local_run_dir, to_yaml
        from vpd_ray.download import fetch_once_per_node
        from vpd_ray.modeling import architecture, build_model

        self.cfg, self.extra = cfg, loop_config
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        if self.rank == 0:
            started(loop_config)  # placed and running: setup (weights, DeepSpeed) may take minutes still
        self.device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        self.run_dir = local_run_dir(cfg)
        # From the real world size, so a restart on another worker count keeps the batch policy.
        self.plan = batch_plan(cfg, self.world)
        fetch_once_per_node(cfg, context.get_local_rank(), dist.barrier)
        _seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        self.resume = _latest_checkpoint()
        if self.resume is not None and self.resume.world_size != self.world:
            self.resume.load_weights(model)  # before DeepSpeed copies them into its fp32 masters
        if cfg.train.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        speed.configure_backends(cfg.train, self.device)
        speed.prepare_model(model, cfg.train)
        self.frozen = ckpt.frozen_state(model)
        self.arch = architecture(model)
        self.config_yaml = to_yaml(cfg)
        self.vae = detach_vae(model).to(self.device, speed.DTYPES[cfg.model.vae_dtype]).eval()
        self.tasks = model.tasks
        groups = param_groups(model.named_parameters(), self.plan.lr, cfg.train.weight_decay, cfg.train.unet_lr_mult)
        names = {id(p): n for n, p in model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))  # each group has its lr
        self.accum = self.plan.accum
        micro = next(iter(self.plan.micro.values()))
        ds_cfg = deepspeed_config(cfg, micro_batch=micro, grad_accum=self.accum)
        if self.rank == 0 and _builds_cpu_comm_op():
            say(loop_config, "building DeepSpeed's CPU shared-memory comm op (once per machine; about 90 s on 2 cores)")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        self.ema = ema.build(self.engine.module, cfg.train.ema_decay)  # None when off (train.ema_decay 0)
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        self.state = RunState()
        self.streams: dict[str, Any] = {}
        t = cfg.train
        self.stepper = Stepper(self.engine, self.tasks, self.vae_encode, accum=self.accum, seed=cfg.run.seed,
                               device=self.device, optimizer=self.optimizer,
                               lr_at=lambda step: lr_factor(step, t.max_steps, t.schedule, t.lr),
                               nan_policy=t.nan_policy, max_nan_skips=t.max_nan_skips, ema=self.ema)
        self.writer = None
        self.clock: tuple[float, int] | None = None  # (time, step) where this attempt's steps began: the ETA
        self.latest: str = ""  # the latest validation's primary metric, for the progress line
        if self.rank == 0:
            log.info(f"[vpd] {self.world} workers: {self.plan.reason}")

    # --- pieces -----------------------------------------------------------------------------
    def forward(self, task_name: str, batch: dict[str, Any]) -> Any:
        """VAE (fp32, outside the engine) then the engine on the latents."""
        return self.engine(task_name, batch, latents=self.vae_encode(batch["image"]))

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen VAE in ``model.vae_dtype``, outside the engine; latents in the engine's dtype."""
        images = speed.to_memory_format(images.float(), self.cfg.train)
        return self.engine.module.backbone.encode(images).to(self.dtype)

    def _streams(self) -> dict[str, Any]:
        from vpd_ray.data.pipeline import build_stream

        d = self.cfg.data
        return {
            name: build_stream(task.cfg.train_shards, task.train_transform, train=True, batch_size=self.plan.micro[name],
                               seed=self.cfg.run.seed, fields=task.fields, num_workers=d.num_workers,
                               shuffle_buffer=d.shuffle_buffer, max_corrupt=d.max_corrupt,
                               position=self.state.data.get(name), jpeg_decode=d.jpeg_decode)
            for name, task in self.tasks.items()
        }

    def validate(self) -> dict[str, float]:
        """Every task's test protocol on its validation split; rank 0 also draws its first
        ``train.log_images`` samples of each into TensorBoard (the same ones each time). Under
        ``train.ema_eval`` the EMA weights are scored, and the raw ones train on afterwards."""
        with ema.evaluating(self.ema, self.cfg.train.ema_eval):
            return self._validate()

    def _validate(self) -> dict[str, float]:
        from vpd_ray.data.pipeline import build_stream
        from vpd_ray.visualize import render

        self.engine.eval()
        metrics, keep = {}, self.cfg.train.log_images if self.rank == 0 else 0
        for name, task in self.tasks.items():
            pictures: list[np.ndarray] = []

            def draw(batch: dict[str, Any], pred: torch.Tensor, task: Any = task, pictures: list = pictures) -> None:
                for i in range(min(batch["image"].shape[0], keep - len(pictures))):
                    pictures.append(render(task.example(batch, pred, i)))

            stream = build_stream(task.cfg.val_shards, task.eval_transform, train=False,
                                  batch_size=task.cfg.eval_batch_size, fields=task.fields,
                                  num_workers=self.cfg.data.num_workers, max_corrupt=self.cfg.data.max_corrupt)

            def forward(images: torch.Tensor, batch: dict[str, Any], name: str = name) -> Any:
                return float_outputs(self.forward(name, {**batch, "image": images}))

            with torch.no_grad():
                metrics.update(evaluate_task(task, forward, stream, self.device, self.cfg.train.max_val_batches,
                                             on_batch=draw if keep else None))
            for i, picture in enumerate(pictures):
                self.tensorboard().add_image(f"{name}/val_{i}", picture, self.state.step, dataformats="HWC")
        self.engine.train()
        return metrics

    def _show_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """One console line per validation (the paper's columns) and every metric in TensorBoard (``val/``)."""
        primary = [f"{task.name}/{task.primary_metric}" for task in self.tasks.values()]
        self.latest = ", ".join(f"{k} {metrics[k]:.4g}" for k in primary if k in metrics) + f" at step {step}"
        row = [f"{task.name}/{key}" for task in self.tasks.values() for key, _ in task.paper_row]  # the seed table's
        shown = " · ".join(f"{k} {metrics[k]:.4g}" for k in row if k in metrics)
        counts = ", ".join(f"{k.split('/')[0]} {int(v)}" for k, v in metrics.items() if k.endswith("/samples"))
        say(self.extra, f"step {step} validation: {shown} ({counts} samples, {seconds:.0f} s)")
        for key, value in metrics.items():
            self.tensorboard().add_scalar(f"val/{key}", value, step)
        self.tensorboard().flush()

    def save_and_report(self, metrics: dict[str, float]) -> None:
        """DeepSpeed shards (every rank, its own temp dir) + rank-0 files, barrier, same dir reported by all."""
        import ray.train

        start = time.perf_counter()
        self.state.data.update({name: self._merged(stream.position).to_dict() for name, stream in self.streams.items()})
        local = tempfile.mkdtemp(prefix=f"vpd_ckpt_rank{self.rank}_")
        self.engine.save_checkpoint(local, tag=ckpt.TAG)
        if self.rank == 0:
            meta = {**dataclasses.asdict(self.state), "zero_stage": int(self.cfg.deepspeed.zero_stage),
                    "world_size": self.world, "param_group_names": self.group_names, "metrics": metrics}
            ckpt.write_rank0_files(local, meta, self.config_yaml, self.frozen, self.arch,
                                   ema=self.ema.state_dict() if self.ema is not None else None)
        written = time.perf_counter() - start
        own = _dir_bytes(local)
        total = int(_all_reduce(torch.tensor([own], dtype=torch.float64, device=self.device)).item())
        dist.barrier()
        name = f"checkpoint_{self.state.step:08d}"
        start = time.perf_counter()
        ray.train.report({**metrics, "step": self.state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name)
        shutil.rmtree(local, ignore_errors=True)
        dist.barrier()  # every rank's part is in storage
        if self.rank == 0:
            storage = ray.train.get_context().get_storage()
            with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{name}/{ckpt.COMPLETE}"):
                pass
            self._event(f"{name}: {human_bytes(total)} over {self.world} ranks (rank 0 {human_bytes(own)}), "
                        f"written in {written:.1f} s, persisted in {time.perf_counter() - start:.1f} s")

    def save_weights(self) -> None:
        """A weights-only checkpoint: a model package of the training weights (the engine's dtype) and
        the frozen fp32 modules, in ``<run>/weights/step_N``; the latest ``weights_keep`` are kept."""
        from vpd_ray.engine.weights import write_weights_package

        start = time.perf_counter()
        if self.cfg.deepspeed.zero_stage == 3:  # a collective: every rank gathers, rank 0 gets the dict
            module = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            module = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            state = {**{k: v.detach().cpu() for k, v in module.items()}, **self.frozen}
            if self.cfg.train.ema_eval:  # the weights validation scores, in the training dtype
                state.update({k: v.to(state[k].dtype) for k, v in self.ema.state_dict().items()})
            name = f"step_{self.state.step:08d}"
            size = write_weights_package(state, self.config_yaml, self.arch, self.cfg.run.storage_path,
                                         f"{self.cfg.run.name}/weights", name, self.cfg.train.checkpoint.weights_keep)
            self._event(f"weights/{name}: {human_bytes(size)} (weights only), written in "
                        f"{time.perf_counter() - start:.1f} s")
        dist.barrier()

    def restore(self) -> None:
        """Continue from the run's latest checkpoint: DeepSpeed's full state on the same worker count;
        on another count the consolidated weights were loaded before DeepSpeed started and the
        optimizer starts fresh. Either way the step, the data epoch and so the LR schedule go on."""
        if self.resume is None:
            return
        same = self.resume.world_size == self.world
        if same:
            self.resume.load_engine(self.engine)
        meta = self.resume.meta
        self.state = RunState(step=meta["step"], data=_data_positions(meta), nan_skips=meta["nan_skips"])
        self.stepper.nan_skips = self.state.nan_skips
        fresh_ema = self.ema is not None and not self._restore_ema()
        if self.rank == 0:
            how = "" if same else (f" on {self.world} workers (saved by {self.resume.world_size}): consolidated "
                                   "weights, fresh optimizer state (AdamW moments reset)")
            how += "; the checkpoint has no EMA: it starts at the resumed weights" if fresh_ema else ""
            how += "" if self.resume.registered else (" (complete in storage; Ray Train had not registered it "
                                                      "when the group was lost)")
            self._event(f"resuming from checkpoint {self.resume.path} at step {self.state.step}{how}", console=True)
            for name, state in self.state.data.items():
                self._event(f"{name} data: {_position_line(state)}")

    def _restore_ema(self) -> bool:
        """The checkpoint's EMA (a full-size state: the same on any worker count); False if it has none
        (saved with ``train.ema_decay`` 0), and then the EMA restarts at the resumed weights."""
        state = self.resume.ema_state()
        if state is None:
            self.ema.reset()
            return False
        self.ema.load_state_dict(state, source=self.resume.path)
        return True

    def _merged(self, position: Any) -> Any:
        """The union of every rank's :class:`DataPosition` (what the whole group has trained on): the
        ranks agree on the epoch range, then take the elementwise max of the dense form."""
        from vpd_ray.data.pipeline import DataPosition

        bounds = torch.tensor([-position.floor, position.last], dtype=torch.int64, device=self.device)
        lo, hi = (sign * int(b) for sign, b in zip((-1, 1), _all_reduce(bounds, dist.ReduceOp.MAX)))
        rows = _all_reduce(torch.from_numpy(position.dense(lo, hi)).to(self.device), dist.ReduceOp.MAX)
        return DataPosition.from_dense(lo, rows.cpu().numpy())

    def _worker_nodes(self) -> list[str]:
        """Each rank's node (Ray node id, shortened, and IP), so events.log says which node a lost rank was on."""
        import ray

        context = ray.get_runtime_context()
        mine = f"node {context.get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
        if not dist.is_initialized():
            return [mine]
        nodes: list[Any] = [None] * self.world
        dist.all_gather_object(nodes, mine)  # between our own ranks
        return nodes

    def _event(self, line: str, console: bool = False) -> None:
        """Rank 0: append to ``<run dir>/events.log`` (restarts, resumes, checkpoints stay on record);
        ``console``: say it too (a resume), else only the worker's log has it."""
        if console:
            say(self.extra, line)
        else:
            log.info(f"[vpd] {line}")
        append_event(self.run_dir, line)

    def tensorboard(self) -> Any:
        """Rank 0's SummaryWriter on ``<run dir>/tensorboard`` (made on first use)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        return self.writer

    def _log(self, step: int, loss: torch.Tensor, seconds: float, samples: int) -> None:
        """Mean loss over ranks; rank 0 says the progress line and writes TensorBoard scalars."""
        mean = _all_reduce(loss.detach().float().reshape(1).clone()).item() / self.world
        if self.rank != 0:
            return
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        rate = samples / max(seconds, 1e-9)
        total = self.cfg.train.max_steps
        began, first = self.clock
        eta = (time.perf_counter() - began) / max(step - first, 1) * (total - step)
        say(self.extra, f"step {step}/{total} · loss {mean:.4f} · lr {lr:.3g} · {rate:.2f} samples/s · "
                        f"ETA {_minutes(eta)}" + (f" · {self.latest}" if self.latest else ""))
        writer = self.tensorboard()
        for key, value in (("train/loss", mean), ("train/lr", lr), ("train/samples_per_s", rate)):
            writer.add_scalar(key, value, step)
        writer.flush()

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        t = self.cfg.train
        self.restore()
        self.streams = self._streams()
        iters = {name: iter(stream) for name, stream in self.streams.items()}
        per_step = self.plan.global_batch
        tick, losses = time.perf_counter(), []
        self.clock = (tick, self.state.step)
        nodes = self._worker_nodes()
        if self.rank == 0:
            where = ", ".join(f"rank {r} on {node}" for r, node in enumerate(nodes))
            self._event(f"worker group: {self.world} workers on {len(set(nodes))} nodes ({where})")
            say(self.extra, f"training: step {self.state.step}/{t.max_steps} on {self.world} workers "
                            f"({len(set(nodes))} node{'s' * (len(set(nodes)) > 1)}), {per_step} samples per step")
        while self.state.step < t.max_steps:
            losses.append(self.stepper.step(self.state.step, iters))
            self.state.step += 1
            self.state.nan_skips = self.stepper.nan_skips
            step = self.state.step
            if step % t.log_every == 0:  # the only read of the losses: one host sync per log_every steps
                self._log(step, torch.stack(losses).mean(), time.perf_counter() - tick, per_step * len(losses))
                tick, losses = time.perf_counter(), []
            if step % t.val_every == 0 or step == t.max_steps:
                began = time.perf_counter()
                metrics = self.validate()
                if self.rank == 0:
                    self._show_validation(step, metrics, time.perf_counter() - began)
                self.save_and_report(metrics)
                tick = time.perf_counter()
            elif t.checkpoint.weights_every and step % t.checkpoint.weights_every == 0:
                self.save_weights()
                tick = time.perf_counter()
        if self.writer is not None:
            self.writer.close()


def _data_positions(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The checkpoint's data positions; a checkpoint from before sample-level positions has only each
    task's epoch, which then starts again from its beginning (as those versions did)."""
    if "data" in meta:
        return meta["data"]
    return {name: {"floor": epoch, "seen": {}} for name, epoch in meta.get("epochs", {}).items()}


def _position_line(state: dict[str, Any]) -> str:
    from vpd_ray.data.pipeline import DataPosition

    if "total" not in state:
        return f"epoch {state['floor']} again from its first sample (the checkpoint predates sample-level positions)"
    position = DataPosition.from_dict(state)
    taken = ", ".join(f"{position.taken(e)} of epoch {e}" for e in sorted(position.seen)) or "none of it yet"
    return f"epoch {position.floor} of {position.total} samples, already trained on: {taken}"


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a (re)started worker group resumes from, and how it was saved."""

    path: str
    checkpoint: Any  # ray.train.Checkpoint
    meta: dict[str, Any]
    registered: bool = True  # False: found complete in storage, newer than what Ray Train had registered

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    def load_engine(self, engine: Any) -> None:
        with self.checkpoint.as_directory() as directory:
            ckpt.assert_safe(directory)
            engine.load_checkpoint(directory, tag=ckpt.TAG, load_module_strict=True)

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """The fp32 EMA of ``ema.safetensors`` (None if absent), read alone through the checkpoint's
        filesystem like meta.json, not by downloading the whole checkpoint."""
        import pyarrow.fs
        from safetensors.torch import load

        fs, path = self.checkpoint.filesystem, f"{self.checkpoint.path}/{ckpt.EMA}"
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return load(f.read())

    def load_weights(self, model: torch.nn.Module) -> None:
        """Consolidated fp32 weights of any ZeRO stage and worker count (the frozen modules included)."""
        from vpd_ray.package import load_strict

        with self.checkpoint.as_directory() as directory:
            load_strict(model, ckpt.consolidated_state_dict(directory), source=directory)


def _latest_checkpoint() -> ResumePoint | None:
    """Ray Train's latest checkpoint, or a newer one complete in the run's storage.

    Ray Train registers a checkpoint when its controller collects every worker's report. A node lost
    after all ranks persisted their parts (and rank 0 marked it ``complete``) but before that
    collection leaves the checkpoint whole on storage and unknown to Ray Train, which would hand the
    restart the one before: up to ``train.val_every`` steps redone, or the run started over."""
    import ray.train

    registered = ray.train.get_checkpoint()
    point = _resume_point(registered) if registered is not None else None
    storage = ray.train.get_context().get_storage()
    newer = _newest_complete(storage.storage_filesystem, storage.experiment_fs_path,
                             after=point.meta["step"] if point else -1)
    if newer is not None:
        point = _resume_point(ray.train.Checkpoint(newer, filesystem=storage.storage_filesystem), registered=False)
    return point


def _resume_point(checkpoint: Any, registered: bool = True) -> ResumePoint:
    import ray.train

    # meta.json alone, through the checkpoint's filesystem: as_directory would download the whole
    # checkpoint (GiBs on cloud storage) before the weights or DeepSpeed's state are even read.
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{ckpt.META}") as f:
        meta = json.loads(f.read())
    meta.setdefault("world_size", ray.train.get_context().get_world_size())  # written before it was recorded
    return ResumePoint(checkpoint.path, checkpoint, meta, registered)


def _newest_complete(fs: Any, run: str, after: int) -> str | None:
    """The path of the run's newest checkpoint marked complete with a step past ``after``, or None."""
    import pyarrow.fs

    best = None
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True)):
        if not entry.base_name.startswith("checkpoint_") or \
                fs.get_file_info(f"{entry.path}/{ckpt.COMPLETE}").type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(f"{entry.path}/{ckpt.META}") as f:
            step = json.loads(f.read())["step"]
        if step > after and (best is None or step > best[0]):
            best = (step, entry.path)
    return best[1] if best else None


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _builds_cpu_comm_op() -> bool:
    """Whether DeepSpeed is about to JIT-build its CPU shared-memory comm op (on the CPU accelerator,
    when the op is compatible and not in torch's extension cache yet): a silent minute and more."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return False
        built = os.path.join(_get_build_directory(builder.NAME, verbose=False), f"{builder.NAME}.so")
        return not os.path.exists(built)
    except Exception:  # an announcement only: never a reason to fail
        return False


def _dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; an input error stops the run without retries
    (:mod:`vpd_ray.engine.input_errors`)."""
    from vpd_ray.config import from_container
    from vpd_ray.engine.input_errors import run_worker

    run_worker(loop_config, lambda: Trainer(from_container(loop_config["config"]), loop_config).run())
