"""The driver side of batch inference: plan, run the Ray Data pipeline, report.

    resolve --input -> drop inputs whose output exists -> Ray Data read -> map_batches(Predictor)
    in an actor pool -> status rows streamed back -> progress lines -> report file + summary line

The job stops early on a refused shard (a field outside the decode whitelist, an incomplete
conversion: DataError raised here with training's message, after the report) and, with
``max_failed``, once more rows than that failed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from vpd_ray.errors import DataError
from vpd_ray.inference import predictor, sources
from vpd_ray.inference.sources import FAILED, REFUSED, SKIPPED, WRITTEN

REPORT_NAME = "infer_report.json"


@dataclasses.dataclass
class InferOptions:
    """Options of ``python -m vpd_ray.infer`` (field names are the CLI flags)."""

    model: str
    input: str
    output: str
    task: str | None = None
    protocol: bool = False
    preview: bool = True  # OUT/preview/NAME.png beside each output
    max_side: int | None = 1024
    batch_size: int = 4
    concurrency: int | None = None  # actors; default: one per GPU, else one
    num_cpus_per_actor: float = 1.0
    max_failed: int | None = None  # stop once more rows than this failed; None: never stop early
    dtype: str = "fp32"  # "bf16": the model under bf16 autocast


@dataclasses.dataclass
class InferSummary:
    images: int  # inputs found
    written: int
    skipped: int  # outputs that already existed
    failed: int
    seconds: float
    failures: list[dict[str, str]]
    stopped: str = ""  # why the job stopped before its end; "" when it ran to the end

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 if any row failed (whether or not the job stopped early for it), 0 when every input was
        written or skipped: a script can trust a 0."""
        return 1 if self.failed else 0

    def line(self, output: str) -> str:
        report = f" (listed in {Path(output) / REPORT_NAME})" if self.failed else ""
        if self.stopped:
            return f"infer: stopped: {self.stopped}; {self.written} written{report}"
        return (
            f"infer: {self.images} images, {self.written} written, {self.skipped} skipped (existing), "
            f"{self.failed} failed{report}, {self.seconds:.1f} s, {self.images_per_s:.2f} images/s -> {output}"
        )


class Progress:
    """Counts status rows, shows them (a bar on a terminal, a line every ``every_s`` seconds
    otherwise: :mod:`vpd_ray.progress`) and says when the job must stop (:attr:`stop`)."""

    def __init__(self, total: int, skipped: int, stream: TextIO = sys.stderr, every_s: float = 5.0,
                 max_failed: int | None = None):
        from vpd_ray.progress import progress

        self.total, self.max_failed = total, max_failed
        self.counts = {WRITTEN: 0, SKIPPED: skipped, FAILED: 0}
        self.failures: list[dict[str, str]] = []
        self.refusal = ""  # the first refused shard's error
        self.start = time.perf_counter()
        # shard samples are only counted as they stream: no total then
        self.bar = progress(total or None, "infer", unit="image", initial=skipped, stream=stream, every_s=every_s)

    def update(self, rows: dict[str, Any]) -> None:
        done = 0
        for source, status, error in zip(rows["source"], rows["status"], rows["error"]):
            if status == REFUSED:
                self.refusal = self.refusal or str(error)
                continue
            self.counts[status] += 1
            done += 1
            if status == FAILED:
                self.failures.append({"input": str(source), "error": str(error)})
        self.bar.set_postfix_str(f"{self.counts[FAILED]} failed")
        self.bar.update(done)

    @property
    def stop(self) -> str:
        """Why the job must stop now ("": go on): a refused shard, or more failed rows than allowed."""
        if self.refusal:
            return self.refusal
        failed = self.counts[FAILED]
        if self.max_failed is None or failed <= self.max_failed:
            return ""
        last = self.failures[-1]
        return f"{failed} failed, more than --max-failed {self.max_failed}; last: {last['input']}: {last['error']}"

    def summary(self) -> InferSummary:
        self.bar.close()
        return InferSummary(self.total, self.counts[WRITTEN], self.counts[SKIPPED], self.counts[FAILED],
                            time.perf_counter() - self.start, self.failures, self.stop)


def actor_resources(concurrency: int | None, num_cpus: float) -> dict[str, Any]:
    """``map_batches`` resources: one GPU per actor where the cluster has GPUs, CPU otherwise."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"compute": ActorPoolStrategy(size=concurrency or gpus), "num_gpus": 1}
    return {"compute": ActorPoolStrategy(size=concurrency or 1), "num_cpus": num_cpus}


def predictor_kwargs(opts: InferOptions, source: sources.InferenceInput) -> dict[str, Any]:
    return {"package": opts.model, "output_dir": opts.output, "task": opts.task, "protocol": opts.protocol,
            "preview": opts.preview, "root": source.root, "max_side": opts.max_side, "dtype": opts.dtype}


def resolve_task(package: str, task: str | None) -> str:
    """The task to run, checked against the package's config on the driver (no weights loaded,
    the package's files checked), so a wrong ``--model`` or ``--task`` is one line here rather than
    an actor's stack trace."""
    from vpd_ray.package import CONFIG, check_package, load_config

    check_package(package)
    tasks = sorted(load_config(str(Path(package) / CONFIG)).tasks)
    if task is None and len(tasks) == 1:
        return tasks[0]
    if task not in tasks:
        raise ValueError(f"--task {task!r}: the package holds tasks {', '.join(tasks)}; choose one")
    return task


def run_inference(opts: InferOptions, stream: TextIO = sys.stderr) -> InferSummary:
    """Run one inference job (Ray must be initialised); writes ``OUT/infer_report.json``.

    Raises DataError (after the report) for a refused shard; a stop for ``max_failed`` is the
    summary's ``stopped``.
    """
    opts = dataclasses.replace(opts, task=resolve_task(opts.model, opts.task))
    source = sources.resolve_input(opts.input)
    total = len(source) if source.kind != "shards" else 0  # shard samples are counted as they stream
    source, skipped = sources.drop_existing(source, opts.output)
    progress = Progress(total, skipped, stream, max_failed=opts.max_failed)
    if len(source):
        dataset = sources.build_dataset(source).map_batches(
            predictor.Predictor,
            fn_constructor_kwargs=predictor_kwargs(opts, source),
            batch_size=opts.batch_size,
            batch_format="numpy",
            **actor_resources(opts.concurrency, opts.num_cpus_per_actor),
        )
        for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(rows)
            if progress.stop:
                break
    summary = progress.summary()
    if source.kind == "shards":
        summary.images = summary.written + summary.skipped + summary.failed
    write_report(summary, opts)
    if progress.refusal:
        raise DataError(progress.refusal)
    return summary


def write_report(summary: InferSummary, opts: InferOptions) -> Path:
    """``OUT/infer_report.json``: the counts, the options and every failed input with its reason."""
    path = Path(opts.output) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {**dataclasses.asdict(summary), "images_per_s": summary.images_per_s, "options": dataclasses.asdict(opts)}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
