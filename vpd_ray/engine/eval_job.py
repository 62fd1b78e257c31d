"""The evaluation job: every task's test protocol on its ``test_shards``, split over Ray workers
(each sample exactly once; metric sums all-reduced), and the seed table's row of each task.

With a report directory, workers also score every sample and draw the worst (:mod:`vpd_ray.report`);
rank 0's metrics checkpoint brings them to the driver, which writes the report.

The weights come from a model package (each worker reads ``model.safetensors``, mmapped), a
training checkpoint or run directory (consolidated once, in one Ray task, and shared with every
worker through the object store), or one of the authors' released ``.pth`` files (depth, seg or refer:
the layout of the config's task; every key reported).
"""

from __future__ import annotations

import os
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf


def load_model(cfg: DictConfig, path: str, weights: Any = None) -> Any:
    """A ``VPDModel`` with the weights at ``path`` (package, checkpoint / run dir, or authors' .pth).

    A checkpoint or run directory is consolidated here, unless ``weights`` (the ObjectRef of
    :func:`share_checkpoint`) holds it consolidated already: then ``path`` is not even looked at.
    """
    from vpd_ray.modeling import build_model
    from vpd_ray.package import WEIGHTS, load_package

    if weights is not None:
        import ray

        return model_from_weights(ray.get(weights))
    if os.path.isfile(os.path.join(path, WEIGHTS)):
        return load_package(path)[0]
    if os.path.isdir(path):
        return model_from_weights(consolidated_weights(path))
    from vpd_ray.model.authors_weights import load_authors_checkpoint

    model = build_model(cfg)  # the layout is the one of the model's (only) task's type
    print(load_authors_checkpoint(path, model).summary(), flush=True)
    return model.eval()


def consolidated_weights(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (or the best of a run) as plain data that rebuilds the model.

    ``{"source": directory, "config": resolved config dict, "architecture": ..., "state": {name: fp32
    ndarray}}``: numpy arrays, because the object store hands those to every process of a node
    zero-copy from shared memory (torch tensors would be copied out per worker).
    """
    from vpd_ray.engine.checkpoint import CONFIG, evaluated_lazy_state_dict, find_checkpoint
    from vpd_ray.package import load_config, read_architecture

    directory = find_checkpoint(path)
    state = evaluated_lazy_state_dict(directory)  # the EMA weights when the run validated on them (ema_eval)
    return {"source": directory,
            "config": OmegaConf.to_container(load_config(os.path.join(directory, CONFIG)), resolve=True),
            "architecture": read_architecture(directory),
            "state": {name: t.contiguous().detach().float().numpy() for name, t in state.items()}}


def model_from_weights(weights: dict[str, Any]) -> Any:
    """The eval-mode ``VPDModel`` of :func:`consolidated_weights`' dict, loaded strictly."""
    import warnings

    import torch

    from vpd_ray.config import from_container
    from vpd_ray.modeling import build_model
    from vpd_ray.package import load_strict

    model = build_model(from_container(weights["config"]), weights["architecture"])
    with warnings.catch_warnings():  # read-only shared memory; load_state_dict only copies from it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {name: torch.from_numpy(array) for name, array in weights["state"].items()}
    load_strict(model, state, source=weights["source"])
    return model.eval()


def _consolidation_task(path: str) -> tuple[str, dict[str, Any]]:
    """Ray task: ``(source, weights)``; the small first return lets the driver see the outcome (or
    the error) without fetching the weights."""
    weights = consolidated_weights(path)
    return weights["source"], weights


def share_checkpoint(path: str) -> Any:
    """Consolidate the checkpoint or run at ``path`` once, in one Ray task (where the storage is: the
    driver needs neither the files nor the RAM); returns the ObjectRef of its weights.

    Returns once the task is done, so eval workers that wait on the ref cannot hold the CPUs the
    task needs.
    """
    import ray

    source, weights = ray.remote(num_cpus=1, num_returns=2)(_consolidation_task).remote(path)
    print(f"consolidated {ray.get(source)} once; the eval workers share it through the object store", flush=True)
    return weights


def eval_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: load the model, evaluate this rank's part of each test split, report; an
    input error (corrupt test data over the limit) stops every worker, not retried."""
    from vpd_ray.engine.input_errors import run_worker

    run_worker(loop_config, lambda: _evaluate_on_worker(loop_config))


def _evaluate_on_worker(loop_config: dict[str, Any]) -> None:
    """With ``loop_config["report_worst"]`` (k), also each task's scores for the report and its k worst
    samples drawn, merged on rank 0 into the metrics checkpoint (:mod:`vpd_ray.report`)."""
    import ray.train
    import ray.train.torch
    import torch

    from vpd_ray import report
    from vpd_ray.config import from_container
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.engine.evaluation import evaluate_task, report_metrics
    from vpd_ray.engine.console import ConsoleStream
    from vpd_ray.engine.speed import autocast
    from vpd_ray.progress import progress

    cfg = from_container(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    model = load_model(cfg, loop_config["checkpoint"], loop_config.get("weights")).to(device)
    worst = loop_config.get("report_worst")
    metrics, collectors = {}, {}
    for name, section in cfg.tasks.items():
        task = model.tasks[name]
        stream = build_stream(section.test_shards, task.eval_transform, train=False,
                              batch_size=section.eval_batch_size, fields=task.fields,
                              num_workers=cfg.data.num_workers, max_corrupt=cfg.data.max_corrupt)

        def forward(images: torch.Tensor, batch: dict[str, Any], name: str = name) -> Any:
            return model.forward_images(name, images, batch)

        if worst is not None:
            collectors[name] = report.Collector(task, worst)
        # rank 0's progress, a line every 10 s on the driver's console (its share of the split)
        bar = progress(None, f"evaluate {name} (rank 0)", unit="sample", stream=ConsoleStream(loop_config))
        collector = collectors.get(name)

        def seen(batch: dict[str, Any], prediction: torch.Tensor, collector: Any = collector, bar: Any = bar) -> None:
            if collector is not None:
                collector(batch, prediction)
            if rank == 0:
                bar.update(batch["image"].shape[0])

        with torch.no_grad(), autocast(device, loop_config.get("dtype", "fp32")):
            metrics.update(evaluate_task(task, forward, stream, device, on_batch=seen))
        if rank == 0:
            bar.close()
    report_metrics(metrics, None if worst is None else report.checkpoint_files(collectors))


def evaluate(cfg: DictConfig, checkpoint: str, report_dir: str | None = None, worst: int = 8,
             dtype: str = "fp32") -> dict[str, float]:
    """Metrics of ``checkpoint`` on the test shards, over ``cfg.scaling`` Ray workers, the model in
    ``dtype`` ("bf16": autocast); with ``report_dir``, also the evaluation report there, ``worst``
    samples per task drawn (:mod:`vpd_ray.report`)."""
    import pyarrow.fs
    import ray

    import tempfile

    from vpd_ray import report
    from vpd_ray.engine import input_errors
    from vpd_ray.engine.console import KEY, Console
    from vpd_ray.engine.train_job import torch_trainer
    from vpd_ray.package import WEIGHTS

    if not ray.is_initialized():
        ray.init(log_to_driver=cfg.run.verbose)
    checkpoint = os.path.abspath(checkpoint)
    loop_config: dict[str, Any] = {"checkpoint": checkpoint, "dtype": dtype}
    # A checkpoint or run dir is consolidated once for all workers; a package each worker mmaps itself.
    if os.path.isdir(checkpoint) and not os.path.isfile(os.path.join(checkpoint, WEIGHTS)):
        loop_config["weights"] = share_checkpoint(checkpoint)
    if report_dir is not None:
        loop_config["report_worst"] = worst
    name = f"{cfg.run.name}-eval-{int(time.time())}"
    try:
        # the console: rank 0's progress lines; a fault's traceback in a local errors.log of this job
        with Console(tempfile.mkdtemp(prefix=f"{name}-")) as console:
            loop_config[KEY] = console.handle
            result = input_errors.fit(lambda box: torch_trainer(eval_loop, {**loop_config, **box}, cfg, name))
        scores = None if report_dir is None else report.from_checkpoint(result.checkpoint)
    finally:  # Ray Train's bookkeeping of this job; the metrics (and the report) are the output
        fs, root = pyarrow.fs.FileSystem.from_uri(cfg.run.storage_path)
        if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(f"{root}/{name}")
    metrics = dict(result.metrics)
    if scores is not None:
        rows = {task: seed_row(metrics, task) for task in scores}
        report.write_report(report_dir, metrics, scores, rows, source=checkpoint)
    return metrics


def seed_rows(metrics: dict[str, float]) -> list[str]:
    """One line per task: the seed table's columns that the task reports."""
    rows = (seed_row(metrics, task) for task in sorted({key.split("/")[0] for key in metrics}))
    return [row for row in rows if row]


def seed_row(metrics: dict[str, float], task: str) -> str:
    """``task``'s line of :func:`seed_rows` and its sample count ("" when it reports no seed column)."""
    from vpd_ray.tasks import get_task

    columns = get_task(task).paper_row
    cells = [(label, metrics[f"{task}/{key}"]) for key, label in columns if f"{task}/{key}" in metrics]
    if not cells:
        return ""
    count = f"  ({int(metrics[f'{task}/samples'])} samples)" if f"{task}/samples" in metrics else ""
    return f"{task}: " + "  ".join(f"{label} {value:.4f}" for label, value in cells) + count
