"""``python -m vpd_ray.bench train``: seconds per optimizer step of the Ray Train + DeepSpeed loop
against a bare PyTorch loop over the same model and the same batches, measured in the same run.

Both run the product's step (:class:`vpd_ray.engine.step.Stepper`): the bare loop over a plain
fp32 module and torch AdamW (:class:`~vpd_ray.engine.step.TorchEngine`), the other inside a Ray
worker over DeepSpeed's engine. Both take their batches from one in-memory list drawn from the
config's train stream (rank 0 of 1), so data loading is out of the figure and the ratio is the
trainer's own overhead: Ray worker dispatch, DeepSpeed's engine, ZeRO bookkeeping, bf16 casting.
One Ray worker, so both do the same arithmetic per step. Prints a markdown table (paste it into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch


def _batches(cfg: Any, task: Any, count: int) -> list[dict[str, Any]]:
    from vpd_ray.data.pipeline import build_stream

    stream = build_stream(task.cfg.train_shards, task.train_transform, train=True, batch_size=task.cfg.batch_size,
                          seed=cfg.run.seed, fields=task.fields, num_workers=0, rank=0, world_size=1)
    return list(itertools.islice(stream, count))


def bare_seconds_per_step(cfg: Any, steps: int, warmup: int) -> float:
    """Plain PyTorch: fp32 model, VAE under no_grad, AdamW with the trainer's param groups."""
    from vpd_ray.engine.optim import param_groups
    from vpd_ray.engine.step import Stepper, TorchEngine
    from vpd_ray.modeling import build_model

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).train()
    name, task = next(iter(model.tasks.items()))
    groups = param_groups(model.named_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.unet_lr_mult)
    optimizer = torch.optim.AdamW(groups)
    stepper = Stepper(TorchEngine(model, optimizer, grad_clip=cfg.train.grad_clip), model.tasks,
                      model.backbone.encode, seed=cfg.run.seed)
    return seconds_per_step(stepper, name, _batches(cfg, task, warmup + steps), warmup)


def seconds_per_step(stepper: Any, name: str, batches: list[dict[str, Any]], warmup: int) -> float:
    """Mean wall time of the product's steps over ``batches`` after the first ``warmup`` of them, with
    no device sync inside the timed steps (as the trainer runs them); shared with ``bench gpu``."""
    it = iter(batches)
    for step in range(warmup):
        stepper.step(step, {name: it})
    start = time.perf_counter()
    for step in range(warmup, len(batches)):
        loss = stepper.step(step, {name: it})
    float(loss)  # the steps queue on a GPU: wait for the last before stopping the clock
    return (time.perf_counter() - start) / (len(batches) - warmup)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray worker: the trainer's own stepper over the same batches."""
    from vpd_ray.config import from_container
    from vpd_ray.engine.evaluation import report_metrics
    from vpd_ray.engine.loop import Trainer

    cfg = from_container(loop_config["config"])
    trainer = Trainer(cfg, loop_config)
    name, task = next(iter(trainer.tasks.items()))
    batches = _batches(cfg, task, loop_config["warmup"] + loop_config["steps"])
    report_metrics({"seconds_per_step": seconds_per_step(trainer.stepper, name, batches, loop_config["warmup"])})


def ray_seconds_per_step(cfg: Any, steps: int, warmup: int) -> float:
    from vpd_ray.engine.train_job import torch_trainer

    trainer = torch_trainer(_ray_worker, {"steps": steps, "warmup": warmup}, cfg, f"bench-{int(time.time())}",
                            num_workers=1)
    return trainer.fit().metrics["seconds_per_step"]


def main(argv: list[str] | None = None) -> int:
    import ray

    from vpd_ray.config import load_or_exit

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    # One worker, no accumulation: one micro-batch per step in both loops.
    fixed = ["scaling.num_workers=1", "train.global_batch_size=null"]
    cfg = load_or_exit(args.config, [*fixed, *args.overrides], need=("train_shards",))
    torch.set_num_threads(1)  # as a Ray worker with one CPU: the same compute budget for both loops
    bare = bare_seconds_per_step(cfg, args.steps, args.warmup)
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    rows = [("bare PyTorch (fp32, 1 process)", bare)]
    for stage, bf16 in ((0, False), (cfg.deepspeed.zero_stage, cfg.deepspeed.bf16)):
        cfg.deepspeed.zero_stage, cfg.deepspeed.bf16 = stage, bf16
        label = f"Ray Train + DeepSpeed ZeRO-{stage} {'bf16' if bf16 else 'fp32'} (1 worker)"
        rows.append((label, ray_seconds_per_step(cfg, args.steps, args.warmup)))
    batch = next(iter(cfg.tasks.values())).batch_size
    print(f"\nconfig {args.config}, micro-batch {batch}, {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| loop | s/step | ratio vs bare |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {seconds / bare:.2f} |")
    return 0
