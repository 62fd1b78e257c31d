"""The evaluation report (``python -m vpd_ray.evaluate --report``): each task's per-sample scores,
the worst-k kept per rank and merged, the Markdown/HTML writer, and the CLI end to end on 2 workers."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vpd_ray import report
from vpd_ray.atomic import TMP_MARK
from vpd_ray.report import Sample, TaskScores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(b: int, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


# --- Task.scores ---------------------------------------------------------------------------------
def test_depth_scores_are_per_image_rmse_grouped_by_scene():
    from vpd_ray.tasks.depth import DepthConfig, DepthTask

    task = DepthTask(DepthConfig(eigen_crop=False))
    gt = torch.full((3, 1, 4, 4), 2.0)
    gt[2, 0, 0] = 0  # a row without measurement: left out, as the metric does
    pred = gt + torch.tensor([0.0, 0.5, 1.0])[:, None, None, None]  # RMSE 0, 0.5 m, 1 m
    values, groups = task.scores(pred, {"depth": gt, "class_id": torch.tensor([15, 15, -1])})
    assert values.dtype == torch.float64 and values.shape == (3, 1)
    assert values[:, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert groups == ["kitchen", "kitchen", "unknown"] and task.score_groups == "scene"
    assert task.metric_mode == "min" and "(m)" in task.score_label


def test_seg_scores_are_per_image_miou_of_the_classes_present():
    from vpd_ray.tasks.seg import SegConfig, SegTask

    task = SegTask(SegConfig(num_classes=3))
    label = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [255, 255]], [[255, 255], [255, 255]]])
    pred = torch.tensor([[[0, 0], [1, 0]], [[2, 2], [0, 0]], [[0, 0], [0, 0]]])
    values, groups = task.scores(pred, {"label": label})
    # image 0: class 0 IoU 2/3, class 1 IoU 1/2, class 2 absent; image 1: ignored pixels count nowhere;
    # image 2: every pixel ignored, nothing to score
    assert values[:2, 0].tolist() == pytest.approx([(2 / 3 + 1 / 2) / 2, 1.0])
    assert math.isnan(values[2, 0]) and groups is None and task.metric_mode == "max"


def test_refer_scores_are_per_sentence_iou_nan_in_empty_slots():
    from vpd_ray.tasks.refer import ReferConfig, ReferTask

    task = ReferTask(ReferConfig(text_encoder="tiny"))
    mask = torch.tensor([[[1, 1], [0, 0]]])
    pred = torch.tensor([[[[1, 1], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]]])  # [B=1, S=3, 2, 2]
    values, groups = task.scores(pred, {"mask": mask, "sentence_valid": torch.tensor([[True, True, False]])})
    assert values[0, :2].tolist() == [1.0, 0.5] and math.isnan(values[0, 2]) and groups is None
    assert task.score_item == "sentence"


# --- worst k, per rank and merged -----------------------------------------------------------------
def test_collector_keeps_the_k_worst_and_draws_only_those_that_enter():
    from vpd_ray.tasks.depth import DepthConfig, DepthTask

    task = DepthTask(DepthConfig(eigen_crop=False))
    drawn = []
    example = task.example
    task.example = lambda batch, prediction, index: drawn.append(batch["__key__"][index]) or example(batch, prediction, index)
    collector = report.Collector(task, 2)
    gt = torch.full((3, 1, 8, 8), 2.0)
    for first, errors in ((0, [4.0, 3.0, 2.0]), (3, [5.0, 0.0, 1.0])):  # RMSE = error
        batch = {"image": _images(3), "depth": gt, "class_id": torch.tensor([15, 15, 15]),
                 "__key__": [f"s{first + i}" for i in range(3)]}
        collector(batch, gt + torch.tensor(errors)[:, None, None, None])
    scores = report.merge([collector.result()], 2)
    assert [s.key for s, _ in scores.worst] == ["s3", "s0"]  # RMSE 5 then 4
    assert drawn == ["s0", "s1", "s3"]  # s2, s4, s5 never entered the worst two: never drawn
    assert Image.open(io.BytesIO(scores.worst[0][1])).size[0] > 100
    assert [s.score for s in scores.samples] == pytest.approx([4, 3, 2, 5, 0, 1])


def _scores(mode: str, keyed: dict[str, float], worst: list[str], group: str | None = None) -> TaskScores:
    samples = [Sample(k, (v,), "a" if group else None) for k, v in keyed.items()]
    by_key = {s.key: s for s in samples}
    return TaskScores("IoU (fraction, 0 to 1)", "image", mode, group, samples, [(by_key[k], k.encode()) for k in worst])


def test_merge_keeps_every_sample_and_the_k_worst_of_all_ranks():
    rank0 = _scores("max", {"a": 0.9, "b": 0.2, "c": 0.5}, ["b", "c"])
    rank1 = _scores("max", {"d": 0.1, "e": 0.7}, ["d", "e"])
    merged = report.merge([rank0, rank1], 3)
    assert [s.key for s, _ in merged.worst] == ["d", "b", "c"] and [p for _, p in merged.worst] == [b"d", b"b", b"c"]
    assert sorted(s.key for s in merged.samples) == ["a", "b", "c", "d", "e"]


def test_checkpoint_files_come_back_from_a_ray_checkpoint(tmp_path):
    """One process (no process group): rank 0's files, as the metrics checkpoint carries them."""
    import ray.train

    from vpd_ray.tasks.refer import ReferConfig, ReferTask

    task = ReferTask(ReferConfig(text_encoder="tiny", max_tokens=8))
    collector = report.Collector(task, 1)
    ids = torch.zeros(1, 2, 8, dtype=torch.long)
    ids[0] = task.tokenize(["the red cup", "the cup"])
    mask = torch.tensor([[1] * 8] * 4 + [[0] * 8] * 4)[None]  # top half
    pred = torch.stack([mask, torch.zeros_like(mask)], 1)  # sentence 1 misses the object entirely
    collector({"image": _images(1), "mask": mask, "input_ids": ids, "sentence_valid": torch.tensor([[True, True]]),
               "__key__": ["ref7"]}, pred)
    for path, data in report.checkpoint_files({"refer": collector}).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    scores = report.from_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path)))["refer"]
    assert scores.items() == [1.0, 0.0] and scores.worst[0][0] == Sample("ref7", (1.0, 0.0))
    assert scores.worst[0][1] == (tmp_path / "report" / "worst" / "refer_1.png").read_bytes()


# --- the writer ------------------------------------------------------------------------------------
def _png(value: int) -> bytes:
    return report.png(np.full((4, 6, 3), value, dtype=np.uint8))


def test_report_shows_row_groups_classes_histogram_and_worst_pictures(tmp_path):
    depth = TaskScores("per-image RMSE (m)", "image", "min", "scene",
                       [Sample("k1", (0.5,), "kitchen"), Sample("b1", (2.0,), "bedroom"), Sample("k2", (1.5,), "kitchen")])
    depth.worst = [(depth.samples[1], _png(10)), (depth.samples[2], _png(20))]
    seg = TaskScores("per-image mIoU (fraction, 0 to 1)", "image", "max", None, [Sample("s1", (0.25,))])
    seg.worst = [(seg.samples[0], _png(30))]
    metrics = {"depth/rmse": 1.3333, "depth/samples": 3.0, "seg/mIoU": 0.4, "seg/IoU.wall": 0.6,
               "seg/IoU.floor": 0.2, "seg/IoU.ring": float("nan"), "seg/samples": 1.0}
    rows = {"depth": "depth: RMSE 1.3333  (3 samples)", "seg": "seg: mIoU 0.4000  (1 samples)"}
    md_path, html_path = report.write_report(str(tmp_path), metrics, {"depth": depth, "seg": seg}, rows, "/pkg")

    with open(md_path) as md_file, open(html_path) as html_file:
        md, page = md_file.read(), html_file.read()
    for row in rows.values():
        assert row in md and row in page
    assert md.index("| bedroom | 1 | 2.0000 | 2.0000 |") < md.index("| kitchen | 2 | 1.0000 | 1.5000 |")  # worst first
    assert md.index("| floor | 0.2000 |") < md.index("| wall | 0.6000 |") and "ring" in md  # absent: named
    for path, value in (("worst/depth_1.png", 10), ("worst/depth_2.png", 20), ("worst/seg_1.png", 30)):
        assert f"]({path})" in md and f'src="{path}"' in page
        assert np.asarray(Image.open(tmp_path / path))[0, 0, 0] == value
    for path in ("depth_hist.png", "seg_hist.png"):
        assert f"]({path})" in md and f'src="{path}"' in page and Image.open(tmp_path / path).size[0] > 300
    assert "1. b1: per-image RMSE (m) 2.0000" in md and "2. k2: per-image RMSE (m) 1.5000" in page  # worst first
    table = json.loads((tmp_path / "scores.json").read_text())
    assert [s["key"] for s in table["depth"]["samples"]] == ["k1", "b1", "k2"]
    assert report.from_json(table, str(tmp_path))["depth"] == depth
    assert not [p for p in tmp_path.rglob(f"*{TMP_MARK}*")]  # no temporary file left


def test_histogram_axes_carry_the_scores_unit(monkeypatch):
    from matplotlib.figure import Figure

    drawn = {}
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn.update(x=ax.get_xlabel(), y=ax.get_ylabel(), bars=len(ax.patches))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    report.histogram("refer", TaskScores("per-sentence IoU (fraction, 0 to 1)", "sentence", "max", None,
                                         [Sample("r", (0.1, 0.9, 0.5))]))
    assert drawn["x"] == "per-sentence IoU (fraction, 0 to 1)" and drawn["y"] == "sentences (count)" and drawn["bars"]


# --- end to end ------------------------------------------------------------------------------------
def _evaluate_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    overrides = ["data.num_workers=0", f"run.storage_path={tmp_path / 'runs'}", "scaling.num_workers=2"]
    proc = subprocess.run([sys.executable, "-m", "vpd_ray.evaluate", "configs/sample.yaml", *args, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_report_of_two_workers_leaves_the_metrics_as_they_are(ray_head, tmp_path):
    from test_infer import export_tiny_package

    from vpd_ray.config import load
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.engine.eval_job import seed_rows
    from vpd_ray.engine.evaluation import evaluate_task
    from vpd_ray.package import load_package

    package = export_tiny_package(tmp_path / "pkg")
    out = tmp_path / "report"
    reported = _evaluate_cli(["--checkpoint", package, "--out", str(tmp_path / "reported.json"),
                              "--report", str(out), "--report-worst", "3"], tmp_path)
    metrics = json.loads((tmp_path / "reported.json").read_text())["metrics"]
    # The same metrics as a plain single-process pass (no report, no Ray): the report changes nothing.
    model, _ = load_package(package)
    task, section = model.tasks["depth"], load("configs/sample.yaml").tasks.depth
    stream = build_stream(section.test_shards, task.eval_transform, train=False, batch_size=section.eval_batch_size,
                          fields=task.fields, num_workers=0)
    with torch.no_grad():
        plain = evaluate_task(task, lambda images, batch: model.forward_images("depth", images, batch), stream,
                              torch.device("cpu"))
    assert metrics.keys() == plain.keys() and all(metrics[k] == pytest.approx(plain[k], rel=1e-5) for k in plain)
    row = seed_rows(metrics)
    assert row and row[0] in reported.stdout.splitlines()
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert row[0] in md and "depth: RMSE" in page and "(64 samples)" in row[0]
    scores = json.loads((out / "scores.json").read_text())["depth"]
    assert len(scores["samples"]) == 64 and len({s["key"] for s in scores["samples"]}) == 64  # both ranks'
    mean = np.mean([s["items"][0] for s in scores["samples"]])
    assert mean == pytest.approx(metrics["depth/rmse"], rel=1e-9)  # per-image RMSE averages to the metric
    worst = sorted((s["items"][0] for s in scores["samples"]), reverse=True)[:3]
    assert [w["score"] for w in scores["worst"]] == worst
    assert "| scene |" in md and "kitchen" in md
    for path in ["depth_hist.png"] + [f"worst/depth_{k}.png" for k in (1, 2, 3)]:
        assert f"]({path})" in md and f'src="{path}"' in page and (out / path).stat().st_size > 1000
    assert not (out / "worst" / "depth_4.png").exists()
