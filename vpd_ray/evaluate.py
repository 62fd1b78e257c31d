"""``python -m vpd_ray.evaluate CONFIG --checkpoint PATH [--out JSON] [key=value ...]``

Runs every task's test protocol on its ``test_shards`` (from CONFIG), split over the Ray workers of
``scaling`` (each sample exactly once; metric sums all-reduced), prints the seed's row
(RMSE d1 d2 d3 REL log10 where the task has them) and writes all metrics as JSON.

``PATH`` is a model package (``vpd_ray.export``), a training checkpoint or run directory, or the
authors' released depth ``.pth`` (loaded into the model CONFIG describes, every key reported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

# (metric key, column) of the seed table; a task class may name its own as ``paper_row``.
SEED_ROW = (("rmse", "RMSE"), ("d1", "d1"), ("d2", "d2"), ("d3", "d3"), ("abs_rel", "REL"), ("log10", "log10"))


def load_model(cfg: DictConfig, path: str) -> Any:
    """A ``VPDModel`` with the weights at ``path`` (package, checkpoint / run dir, or authors' .pth)."""
    from vpd_ray.package import WEIGHTS, build_model, load_package

    if os.path.isfile(os.path.join(path, WEIGHTS)):
        return load_package(path)[0]
    if os.path.isdir(path):
        from vpd_ray.engine.checkpoint import CONFIG, consolidated_state_dict
        from vpd_ray.export import find_checkpoint
        from vpd_ray.package import load_config, load_strict, read_architecture

        directory = find_checkpoint(path)
        model = build_model(load_config(os.path.join(directory, CONFIG)), read_architecture(directory))
        load_strict(model, consolidated_state_dict(directory), source=directory)
        return model.eval()
    from vpd_ray.model.checkpoint import load_vpd_depth_checkpoint

    model = build_model(cfg)
    print(load_vpd_depth_checkpoint(path, model).summary(), flush=True)
    return model.eval()


def eval_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: load the model, evaluate this rank's part of each test split, report."""
    import ray.train
    import ray.train.torch
    import torch

    from vpd_ray.config import from_container
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.engine.evaluation import evaluate_task, report_metrics

    cfg = from_container(loop_config["config"])
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    model = load_model(cfg, loop_config["checkpoint"]).to(device)
    metrics = {}
    for name, section in cfg.tasks.items():
        task = model.tasks[name]
        stream = build_stream(section.test_shards, task.eval_transform, train=False,
                              batch_size=section.eval_batch_size, fields=task.fields,
                              num_workers=cfg.data.num_workers, max_corrupt=cfg.data.max_corrupt)

        def forward(images: torch.Tensor, batch: dict[str, Any], name: str = name) -> Any:
            return model.forward_images(name, images, batch)

        with torch.no_grad():
            metrics.update(evaluate_task(task, forward, stream, device))
    report_metrics(metrics)


def evaluate(cfg: DictConfig, checkpoint: str) -> dict[str, float]:
    """Metrics of ``checkpoint`` on the test shards, over ``cfg.scaling`` Ray workers."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        eval_loop,
        train_loop_config={"config": OmegaConf.to_container(cfg, resolve=True), "checkpoint": os.path.abspath(checkpoint)},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=dict(cfg.scaling.resources_per_worker) or None),
        run_config=RunConfig(name=f"{cfg.run.name}-eval-{int(time.time())}", storage_path=cfg.run.storage_path),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
    )
    return dict(trainer.fit().metrics)


def seed_rows(metrics: dict[str, float]) -> list[str]:
    """One line per task: the seed table's columns that the task reports."""
    from vpd_ray.tasks import get_task

    rows = []
    for task in sorted({key.split("/")[0] for key in metrics}):
        columns = getattr(get_task(task), "paper_row", SEED_ROW)
        cells = [(label, metrics[f"{task}/{key}"]) for key, label in columns if f"{task}/{key}" in metrics]
        if cells:
            rows.append(f"{task}: " + "  ".join(f"{label} {value:.4f}" for label, value in cells))
    return rows


def main(argv: list[str] | None = None) -> None:
    from vpd_ray.config import load_or_exit

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config whose tasks name test_shards")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--checkpoint", required=True, help="package, checkpoint/run dir, or the authors' .pth")
    parser.add_argument("--out", default=None, help="JSON file to write (default: <checkpoint>.eval.json)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --checkpoint
    cfg = load_or_exit(args.config, args.overrides, need=("test_shards",))
    if not os.path.exists(args.checkpoint):
        print(f"config error: --checkpoint: path not found: {args.checkpoint}", file=sys.stderr)
        sys.exit(2)
    metrics = evaluate(cfg, args.checkpoint)
    for row in seed_rows(metrics):
        print(row)
    out = args.out or os.path.abspath(args.checkpoint).rstrip("/") + ".eval.json"
    with open(out, "w") as f:
        json.dump({"checkpoint": os.path.abspath(args.checkpoint), "metrics": metrics}, f, indent=1)
    print(f"metrics written to {out}")


if __name__ == "__main__":
    main()
