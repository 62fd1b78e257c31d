"""The evaluation report of ``python -m vpd_ray.evaluate --report DIR``: where a model fails.

Per task: the seed table's row, the scores by group (depth: per scene) and per class (seg: the
``IoU.<class>`` metrics), a histogram of the per-image (refer: per-sentence) scores, and the k worst
samples drawn by the task itself (``Task.example``). ``DIR/report.md`` and the self-contained
``DIR/report.html`` share the pictures beside them (``DIR/<task>_hist.png``, ``DIR/worst/<task>_<k>.png``);
``DIR/scores.json`` holds every sample's scores by key.

How the scores travel: on each eval worker a :class:`Collector` (``evaluate_task``'s ``on_batch``)
scores every batch (``Task.scores``) and keeps its rank's k worst in a heap, drawing a sample only
when it enters; :func:`checkpoint_files` merges every rank's on rank 0, whose small metrics
checkpoint carries them as files (Ray Train v2 hands the driver metrics only with a checkpoint);
the driver reads them back (:func:`from_checkpoint`) and writes the report (:func:`write_report`).
"""

from __future__ import annotations

import dataclasses
import heapq
import html
import io
import json
import math
import os
import re
from typing import Any

import numpy as np

from vpd_ray.atomic import atomic_write
from vpd_ray.contracts import Batch
from vpd_ray.tasks.base import Task

FOLDER = "report"  # in the metrics checkpoint
SCORES = "scores.json"
PER_CLASS = "IoU."  # SegMetric.compute's per-class metrics: "IoU.<class name>"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluated sample: its shard key, its item scores (an image's one, a ref's sentences'), its group."""

    key: str
    items: tuple[float, ...]
    group: str | None = None

    @property
    def score(self) -> float:
        """What ranks the sample: the mean of its items."""
        return sum(self.items) / len(self.items)


@dataclasses.dataclass
class TaskScores:
    """One task's scores (one rank's, or every rank's merged) and how to read them."""

    label: str  # Task.score_label: the quantity and its unit
    item: str  # Task.score_item: what one item score is of
    mode: str  # Task.metric_mode: "min" when lower scores are better
    group: str | None  # Task.score_groups: what the samples' groups are
    samples: list[Sample] = dataclasses.field(default_factory=list)
    worst: list[tuple[Sample, bytes]] = dataclasses.field(default_factory=list)  # (sample, PNG), worst first

    def badness(self, score: float) -> float:
        """Larger for a worse score, whichever way the scores point."""
        return score if self.mode == "min" else -score

    def items(self) -> list[float]:
        return [v for s in self.samples for v in s.items]


# --- on the workers -----------------------------------------------------------------------------
class Collector:
    """``on_batch`` of ``evaluate_task`` for one task on one rank: scores every sample and keeps the
    ``k`` worst drawn, rendering a sample only when it enters them (a heap of the kept)."""

    def __init__(self, task: Task, k: int):
        self.task, self.k = task, k
        self.scores = TaskScores(task.score_label, task.score_item, task.metric_mode, task.score_groups)
        self._heap: list[tuple[float, int, Sample, bytes]] = []  # (badness, -arrival, ...): [0] the least bad kept

    def __call__(self, batch: Batch, prediction: Any) -> None:
        values, groups = self.task.scores(prediction, batch)  # [B, N] float64, NaN: no item
        for index, row in enumerate(values.tolist()):
            items = tuple(v for v in row if not math.isnan(v))
            if items:
                sample = Sample(batch["__key__"][index], items, groups[index] if groups else None)
                self.scores.samples.append(sample)
                self._offer(sample, batch, prediction, index)

    def _offer(self, sample: Sample, batch: Batch, prediction: Any, index: int) -> None:
        """Keep ``sample`` drawn if it is among the ``k`` worst so far (ties keep the earlier one)."""
        rank = (self.scores.badness(sample.score), -len(self.scores.samples))
        if len(self._heap) >= self.k and not (self._heap and rank > self._heap[0][:2]):
            return
        from vpd_ray.visualize import render

        entry = (*rank, sample, png(render(self.task.example(batch, prediction, index))))
        (heapq.heappush if len(self._heap) < self.k else heapq.heapreplace)(self._heap, entry)

    def result(self) -> TaskScores:
        return dataclasses.replace(self.scores, worst=[(s, p) for *_, s, p in self._heap])


def merge(parts: list[TaskScores], k: int) -> TaskScores:
    """Every rank's scores of one task as one: all samples, the ``k`` worst of all (worst first)."""
    first = parts[0]
    worst = sorted((w for part in parts for w in part.worst), key=lambda w: (-first.badness(w[0].score), w[0].key))
    return dataclasses.replace(first, samples=[s for part in parts for s in part.samples], worst=worst[:k])


def checkpoint_files(collectors: dict[str, Collector]) -> dict[str, bytes] | None:
    """On rank 0: every rank's scores of each task merged, as ``{path in the metrics checkpoint:
    bytes}``; None on the others. ``gather_object`` runs between this job's own ranks only (trusted data)."""
    import torch.distributed as dist

    from vpd_ray.engine.collectives import distributed, rank

    mine = {name: c.result() for name, c in collectors.items()}
    parts = [mine]
    if distributed():
        parts = [None] * dist.get_world_size() if rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if rank() != 0:
            return None
    merged = {name: merge([part[name] for part in parts], c.k) for name, c in collectors.items()}
    files = {f"{FOLDER}/{path}": data for path, data in pictures(merged).items()}
    return {**files, f"{FOLDER}/{SCORES}": json.dumps(to_json(merged), indent=1).encode()}


def png(picture: np.ndarray) -> bytes:
    """An ``HxWx3`` uint8 picture as PNG bytes (a small fraction of the pixels' size to gather)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


# --- files --------------------------------------------------------------------------------------
def picture_path(task: str, k: int) -> str:
    """The ``k``-th worst sample's picture (1: the worst), relative to the report."""
    return f"worst/{task}_{k}.png"


def pictures(scores: dict[str, TaskScores]) -> dict[str, bytes]:
    return {picture_path(name, k): data for name, s in scores.items() for k, (_, data) in enumerate(s.worst, 1)}


def to_json(scores: dict[str, TaskScores]) -> dict[str, Any]:
    """``scores.json``: per task how to read the scores, every sample's, the worst with their pictures."""
    return {name: {"label": s.label, "item": s.item, "mode": s.mode, "group": s.group,
                   "samples": [dataclasses.asdict(sample) for sample in s.samples],
                   "worst": [{**dataclasses.asdict(sample), "score": sample.score, "picture": picture_path(name, k)}
                             for k, (sample, _) in enumerate(s.worst, 1)]}
            for name, s in scores.items()}  # fmt: skip


def from_json(table: dict[str, Any], directory: str) -> dict[str, TaskScores]:
    """:func:`to_json`'s table back as scores, the pictures read from under ``directory``."""
    def sample(entry: dict[str, Any]) -> Sample:
        return Sample(entry["key"], tuple(entry["items"]), entry["group"])

    def picture(entry: dict[str, Any]) -> bytes:
        with open(os.path.join(directory, entry["picture"]), "rb") as f:
            return f.read()

    return {name: TaskScores(t["label"], t["item"], t["mode"], t["group"], [sample(s) for s in t["samples"]],
                             [(sample(w), picture(w)) for w in t["worst"]])
            for name, t in table.items()}


def from_checkpoint(checkpoint: Any) -> dict[str, TaskScores]:
    """The scores that :func:`checkpoint_files` put into a ``ray.train.Checkpoint``."""
    with checkpoint.as_directory() as directory, open(os.path.join(directory, FOLDER, SCORES)) as f:
        return from_json(json.load(f), os.path.join(directory, FOLDER))


# --- the report ---------------------------------------------------------------------------------
def write_report(directory: str, metrics: dict[str, float], scores: dict[str, TaskScores],
                 rows: dict[str, str], source: str) -> list[str]:
    """``directory/report.md`` and ``report.html`` of an evaluation of ``source``; ``rows``: each task's
    seed-table row. The pictures and ``scores.json`` are written first, so a report never points at a
    missing file. Returns the two report paths."""
    files = {**pictures(scores), SCORES: json.dumps(to_json(scores), indent=1).encode()}
    files.update({histogram_path(name): histogram(name, s) for name, s in scores.items() if s.samples})
    for path, data in files.items():
        atomic_write(os.path.join(directory, path), data)
    blocks: list[Block] = [("h", 1, "Evaluation report"), ("p", f"checkpoint: {source}")]
    for name, s in scores.items():
        blocks += task_blocks(name, metrics, s, rows[name])
    out = [os.path.join(directory, "report.md"), os.path.join(directory, "report.html")]
    atomic_write(out[0], to_markdown(blocks).encode())
    atomic_write(out[1], to_html(blocks).encode())
    return out


def histogram_path(task: str) -> str:
    return f"{task}_hist.png"


def histogram(task: str, scores: TaskScores) -> bytes:
    """PNG of the item scores' histogram, axes in the scores' unit and item counts, the mean marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    items = scores.items()
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(items, bins="auto", color="#4c72b0", edgecolor="white")
    ax.axvline(float(np.mean(items)), color="black", linestyle="--", label=f"mean {np.mean(items):.4f}")
    ax.set_xlabel(scores.label)
    ax.set_ylabel(f"{scores.item}s (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{task}: {len(items)} {scores.item}s")
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# A report is a list of blocks, written as Markdown and as HTML from the same list:
# ("h", level, text), ("p", text), ("code", text), ("table", header, rows), ("figure", path, caption).
Block = tuple[Any, ...]


def task_blocks(name: str, metrics: dict[str, float], scores: TaskScores, row: str) -> list[Block]:
    """One task's section: row, per group, per class, distribution, worst samples."""
    return [("h", 2, name), *([("code", row)] if row else []), *group_blocks(scores), *class_blocks(name, metrics),
            *distribution_blocks(name, scores), *worst_blocks(name, scores)]


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def group_blocks(scores: TaskScores) -> list[Block]:
    """Count, mean and worst score of each group, worst mean first (depth: the scene's RMSE)."""
    if scores.group is None or not scores.samples:
        return []
    groups: dict[str, list[float]] = {}
    for sample in scores.samples:
        groups.setdefault(sample.group, []).append(sample.score)
    mean = {g: float(np.mean(values)) for g, values in groups.items()}
    table = [(g, str(len(groups[g])), _number(mean[g]), _number(max(groups[g], key=scores.badness)))
             for g in sorted(groups, key=lambda g: (-scores.badness(mean[g]), g))]
    header = (scores.group, f"{scores.item}s", f"mean {scores.label}", f"worst {scores.label}")
    return [("h", 3, f"Per {scores.group}"), ("table", header, table)]


def class_blocks(name: str, metrics: dict[str, float]) -> list[Block]:
    """Each class's IoU over the split, worst first; classes in neither prediction nor label named after."""
    prefix = f"{name}/{PER_CLASS}"
    iou = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
    if not iou:
        return []
    present = sorted((c for c in iou if not math.isnan(iou[c])), key=lambda c: (iou[c], c))
    blocks: list[Block] = [("h", 3, "Per class"), ("table", ("class", "IoU"), [(c, _number(iou[c])) for c in present])]
    absent = [c for c in iou if math.isnan(iou[c])]
    if absent:
        blocks.append(("p", f"in neither prediction nor label (no IoU): {', '.join(absent)}"))
    return blocks


def distribution_blocks(name: str, scores: TaskScores) -> list[Block]:
    items = scores.items()
    if not items:
        return [("h", 3, "Distribution"), ("p", f"no {scores.item} was scored")]
    summary = (f"{len(items)} {scores.item}s: mean {np.mean(items):.4f}, median {np.median(items):.4f}, "
               f"worst {max(items, key=scores.badness):.4f} ({scores.label})")
    return [("h", 3, "Distribution"), ("p", summary), ("figure", histogram_path(name), f"{name}: {scores.label}")]


def worst_blocks(name: str, scores: TaskScores) -> list[Block]:
    """The worst samples' pictures, worst first, each captioned with its key and score."""
    if not scores.worst:
        return []
    direction = "highest" if scores.mode == "min" else "lowest"
    blocks: list[Block] = [("h", 3, f"Worst samples ({direction} {scores.label} first)")]
    for k, (sample, _) in enumerate(scores.worst, 1):
        caption = f"{k}. {sample.key}: {scores.label} {_number(sample.score)}"
        if len(sample.items) > 1:
            caption += f" (mean of {len(sample.items)} {scores.item}s: {', '.join(map(_number, sample.items))})"
        blocks.append(("figure", picture_path(name, k), caption))
    return blocks


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _md(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_row(cells: Any) -> str:
    return "| " + " | ".join(cells) + " |"


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for kind, *args in blocks:
        if kind == "h":
            parts.append("#" * args[0] + " " + _md(args[1]))
        elif kind == "p":
            parts.append(_md(args[0]))
        elif kind == "code":
            parts.append(f"```\n{args[0]}\n```")
        elif kind == "table":
            header, rows = args
            parts.append("\n".join([_md_row(map(_md, header)), _md_row(["---"] * len(header)),
                                    *(_md_row(map(_md, row)) for row in rows)]))
        elif kind == "figure":
            path, caption = args
            parts.append(f"![{_md(caption)}]({path})\n\n{_md(caption)}")
    return "\n\n".join(parts) + "\n"


HTML_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
              "figure{margin:1em 0}img{max-width:100%}pre{background:#f4f4f4;padding:.6em}")


def to_html(blocks: list[Block]) -> str:
    """One HTML file (its style inline) that shows the pictures beside it by relative path."""
    e = html.escape
    parts = []
    for kind, *args in blocks:
        if kind == "h":
            parts.append(f"<h{args[0]}>{e(args[1])}</h{args[0]}>")
        elif kind == "p":
            parts.append(f"<p>{e(args[0])}</p>")
        elif kind == "code":
            parts.append(f"<pre>{e(args[0])}</pre>")
        elif kind == "table":
            header, rows = args
            lines = [("th", header), *(("td", row) for row in rows)]
            parts.append("<table>" + "".join("<tr>" + "".join(f"<{tag}>{e(c)}</{tag}>" for c in line) + "</tr>"
                                             for tag, line in lines) + "</table>")
        elif kind == "figure":
            path, caption = args
            parts.append(f'<figure><img src="{e(path)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n")
