"""What a run will do, before it does it: the batch plan, steps and epochs, model and checkpoint sizes.

Printed by ``--dry-run`` (``train``, ``tune``, ``evaluate``) and at the start of every run. Model
sizes come from a copy of the model built on the meta device (no weights are read or allocated),
so the plan of an SD-1.5 run costs a second on a laptop without the weights; where the UNet/VAE
configs cannot be read here (a hub id not in the local cache), SD v1-5's shipped configs are used
and the plan says so.

Checkpoint sizes are estimates from parameter counts (what DeepSpeed writes, without ZeRO padding
or pickle overhead): the module's weights in the training dtype on rank 0, fp32 master weights and
both AdamW moments (12 bytes per trainable parameter) split over the ranks, and the frozen modules
in fp32. A weights-only checkpoint is the module's weights and the frozen modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from omegaconf import DictConfig

from vpd_ray.paths import human_bytes

SD15_DIR = os.path.join(os.path.dirname(__file__), "model", "sd15")


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    engine_params: int  # parameters inside the DeepSpeed engine (everything but the VAE)
    engine_buffers: int  # their buffers (BatchNorm statistics, class embeddings), fp32
    trainable: int  # parameters the optimizer holds
    frozen: int  # elements of the modules kept outside the engine or never trained (VAE encoder)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointSizes:
    total: int  # bytes of one full checkpoint over all ranks
    rank0: int
    other_rank: int
    weights_only: int


def _architecture(backbone: DictConfig) -> tuple[dict[str, Any] | None, str]:
    """The UNet/VAE configs of the backbone (None for ``tiny``) and a note on where they came from."""
    if backbone.source == "tiny":
        return None, ""
    folder = backbone.config_path if backbone.source == "single_file" else backbone.path
    found = {part: _read_config(folder, part) for part in ("unet", "vae")}
    if all(found.values()):
        return found, ""
    sd15 = {part: _read_json(os.path.join(SD15_DIR, f"{part}_config.json")) for part in ("unet", "vae")}
    return sd15, f"UNet/VAE configs of {folder!r} not readable here: SD v1-5 shapes assumed"


def _read_config(folder: str, part: str) -> dict[str, Any] | None:
    local = os.path.join(os.path.expanduser(folder), part, "config.json")
    if os.path.isfile(local):
        return _read_json(local)
    from vpd_ray.paths import looks_like_hub_id

    if looks_like_hub_id(folder):
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(folder, f"{part}/config.json")
        if isinstance(cached, str):
            return _read_json(cached)
    return None


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def model_counts(cfg: DictConfig) -> ModelCounts:
    """Parameter counts of the run's model, built on the meta device."""
    import torch

    from vpd_ray.modeling import build_model

    arch, note = _architecture(cfg.model.backbone)
    with torch.device("meta"):
        model = build_model(_builtin_weights(cfg), arch) if arch is not None else build_model(_builtin_weights(cfg))
    vae = model.backbone.vae
    vae_ids = {id(t) for t in (*vae.parameters(), *vae.buffers())}
    engine = [p for p in model.parameters() if id(p) not in vae_ids]
    frozen = sum(t.numel() for t in (*vae.parameters(), *vae.buffers()))
    frozen += sum(b.numel() for b in model.backbone.class_embeddings.buffers())
    return ModelCounts(
        engine_params=sum(p.numel() for p in engine),
        engine_buffers=sum(b.numel() for b in model.buffers() if id(b) not in vae_ids),
        trainable=sum(p.numel() for p in engine if p.requires_grad),
        frozen=frozen,
        note=note,
    )


def _builtin_weights(cfg: DictConfig) -> DictConfig:
    """A copy whose task options marked ``metadata={"weights": (builtin, ...)}`` (the refer task's CLIP
    text encoder) name their built-in stand-in: those models stay outside the engine and checkpoints."""
    import dataclasses as dc

    from vpd_ray.tasks import get_task

    cfg = cfg.copy()
    for name, section in cfg.tasks.items():
        for field in dc.fields(get_task(name).config_class):
            if field.metadata.get("weights"):
                section[field.name] = field.metadata["weights"][0]
    return cfg


def checkpoint_sizes(counts: ModelCounts, workers: int, bf16: bool) -> CheckpointSizes:
    """Estimated bytes of one checkpoint (see the module docstring)."""
    module = counts.engine_params * (2 if bf16 else 4) + counts.engine_buffers * 4
    optimizer = counts.trainable * 12  # fp32 masters + exp_avg + exp_avg_sq
    frozen = counts.frozen * 4
    share = optimizer // workers
    return CheckpointSizes(total=module + optimizer + frozen, rank0=module + frozen + share, other_rank=share,
                           weights_only=module + frozen)


def split_samples(cfg: DictConfig, key: str = "train_shards") -> dict[str, int | None]:
    """Per task, the sample count of split ``key`` from the manifests visible here (None: not visible)."""
    from vpd_ray.data.tario import read_manifest
    from vpd_ray.data.tario import expand_urls

    counts = {}
    for name, task in cfg.tasks.items():
        total, seen = 0, {}
        for url in expand_urls(task[key]) if task[key] else []:
            group = url.rsplit("-", 1)[0]
            if group not in seen:
                try:
                    manifest = read_manifest(url)
                except OSError:
                    manifest = None
                seen[group] = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
            count = seen[group].get(os.path.basename(url))
            if count is None:
                total = None
                break
            total += count
        counts[name] = total if task[key] else None
    return counts


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def describe_evaluation(cfg: DictConfig, checkpoint: str) -> list[str]:
    """The plan of ``python -m vpd_ray.evaluate``: workers, model, test samples, what is loaded."""
    from vpd_ray.package import WEIGHTS

    lines = describe(cfg, training=False)
    for name, samples in split_samples(cfg, "test_shards").items():
        count = f"{samples} samples" if samples else "samples unknown (no manifest visible here)"
        lines.append(f"test: tasks.{name}: {count}, batch {cfg.tasks[name].eval_batch_size} per worker")
    if os.path.isfile(os.path.join(checkpoint, WEIGHTS)):
        kind = "a model package, read by every worker"
    elif os.path.isdir(checkpoint):
        kind = "a checkpoint or run directory, consolidated once in a Ray task and shared"
    else:
        kind = "a weights file in the authors' layout, loaded by every worker" if os.path.exists(checkpoint) else "on the cluster"
    lines.append(f"checkpoint: {checkpoint} ({kind})")
    return lines


def describe(cfg: DictConfig, workers: int | None = None, training: bool = True) -> list[str]:
    """The plan as printable lines; ``workers`` defaults to ``scaling.num_workers``."""
    from vpd_ray.config import batch_plan, worker_range

    t = cfg.train
    low, high = worker_range(cfg)
    workers = workers or high
    device = "GPU" if cfg.scaling.use_gpu else "CPU"
    count = f"{workers}" if low == high or workers != high else f"{low} to {high}, elastic"
    lines = [f"workers: {count} ({device}, scaling.num_workers), DeepSpeed ZeRO-{cfg.deepspeed.zero_stage} "
             f"{'bf16' if cfg.deepspeed.bf16 else 'fp32'}"]
    counts = model_counts(cfg)
    lines.append(f"model: {_millions(counts.trainable)} trainable parameters, {_millions(counts.frozen)} frozen "
                 f"(VAE encoder, class embeddings)" + (f"; {counts.note}" if counts.note else ""))
    if not training:
        return lines
    plan = batch_plan(cfg, workers)
    lines.append(f"batch: {plan.reason}")
    if low != high and workers == high:
        fewest = batch_plan(cfg, low)
        lines.append(f"elastic: recomputed at every (re)start from the real count; on {low}: {fewest.reason}, "
                     f"lr {fewest.lr:.3g}")
    lines.append(f"lr: {plan.lr:.3g} (train.lr {t.lr:.3g} x {plan.lr_factor:.4g}), schedule {t.schedule.kind}")
    for name, samples in split_samples(cfg).items():
        seen = t.max_steps * plan.micro[name] * workers * plan.accum
        if len(cfg.tasks) > 1:
            seen = int(seen * cfg.tasks[name].batch_share / sum(s.batch_share for s in cfg.tasks.values()))
        epochs = f"= {seen / samples:.1f} epochs of {samples}" if samples else "(epochs unknown: no manifest visible here)"
        lines.append(f"steps: {t.max_steps} (train.max_steps), tasks.{name}: {seen} samples {epochs}")
    sizes = checkpoint_sizes(counts, workers, cfg.deepspeed.bf16)
    every = t.checkpoint.weights_every
    lines.append(f"checkpoint: ~{human_bytes(sizes.total)} each (rank 0 ~{human_bytes(sizes.rank0)}, other ranks "
                 f"~{human_bytes(sizes.other_rank)}), every {t.val_every} steps (train.val_every), best {t.checkpoint.keep} kept")
    if every:
        lines.append(f"weights-only checkpoint: ~{human_bytes(sizes.weights_only)} every {every} steps, latest "
                     f"{t.checkpoint.weights_keep} kept")
    return lines
