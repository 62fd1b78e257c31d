"""Multitask: depth + seg on one backbone reach both single-task bars within the same per-task step
budget as the single-task seg test; configs/sample_multitask.yaml is a valid two-task config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_seg import SEG_STEPS, SEG_TINY, assert_seg_learned

REPO = Path(__file__).resolve().parent.parent
DEPTH_TINY = dict(crop_size=[128, 128], head_dim=16, eigen_crop=False)  # sample images are 128x128


def mean_depth_baseline(model) -> float:
    """Validation RMSE of predicting the mean validation depth everywhere (as ``tests/test_train.py``)."""
    from learning_loop import evaluate

    gts = []
    evaluate(model, "depth", predict=lambda b: gts.append(b["depth"][b["depth"] > 0]) or b["depth"])
    mean = float(torch.cat(gts).mean())
    return evaluate(model, "depth", predict=lambda b: torch.full_like(b["depth"], mean))["rmse"]


@pytest.mark.slow
def test_depth_and_seg_reach_both_single_task_bars():
    from learning_loop import build, evaluate, train

    from vpd_ray.tasks.depth import DepthConfig, DepthTask
    from vpd_ray.tasks.seg import SegConfig, SegTask

    model = build({"depth": DepthTask(DepthConfig(**DEPTH_TINY)), "seg": SegTask(SegConfig(**SEG_TINY))})
    assert model.tasks["seg"].context_tokens() != model.tasks["depth"].context_tokens()
    losses = train(model, SEG_STEPS, lr=1e-3)  # every step: one depth batch and one seg batch
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    rmse, baseline = evaluate(model, "depth")["rmse"], mean_depth_baseline(model)
    print(f"\nmultitask depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}")
    assert rmse < 0.8 * baseline, f"depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}"
    assert_seg_learned(model)


@pytest.mark.parametrize("name", ["sample_multitask", "sample_seg", "sample_refer"])
def test_sample_configs_validate(name, monkeypatch):
    from vpd_ray.config import load

    monkeypatch.chdir(REPO)  # the sample configs name shards relative to the repository root
    cfg = load(str(REPO / "configs" / f"{name}.yaml"))
    assert set(cfg.tasks) == {"sample_multitask": {"depth", "seg"}, "sample_seg": {"seg"}, "sample_refer": {"refer"}}[name]


@pytest.mark.parametrize(("name", "tasks", "steps"), [("ade20k", ["seg"], 80000), ("refcoco", ["refer"], 53005),
                                                      ("refcoco+", ["refer"], 52847), ("refcocog", ["refer"], 52782),
                                                      ("multitask", ["depth", "seg"], 80000)])  # fmt: skip
def test_full_configs_compose_with_reference_numbers(name, tasks, steps):
    from vpd_ray.config import batch_plan, compose

    cfg = compose(str(REPO / "configs" / f"{name}.yaml"))  # shards and embeddings live on the cluster
    assert list(cfg.tasks) == tasks and cfg.train.max_steps == steps
    assert batch_plan(cfg).accum == 1
    if "seg" in cfg.tasks:
        assert cfg.tasks.seg.num_classes == 150 and cfg.train.global_batch_size == 16
    if "refer" in cfg.tasks:
        assert cfg.tasks.refer.max_tokens == (77 if name == "refcocog" else 40) and cfg.train.lr == 5e-5
