"""The successors' recipes (README "Recipes") still learn on the synthetic depth samples: loss falls
and the validation RMSE beats the mean-depth baseline, in the same step budget as the multitask test.
Each recipe's own effect (what it changes) is tested beside its code."""

from __future__ import annotations

import numpy as np
import pytest

from test_multitask import DEPTH_TINY, mean_depth_baseline

STEPS = 100


@pytest.mark.slow
def test_corrected_latent_scale_learns():
    """TADP's latent scaling (x 0.18215): smaller UNet inputs, the same learning."""
    from learning_loop import build, evaluate, train

    from vpd_ray.tasks.depth import DepthConfig, DepthTask

    model = build({"depth": DepthTask(DepthConfig(**DEPTH_TINY))}, latent_scale=0.18215)
    losses = train(model, STEPS, lr=1e-3)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    rmse, baseline = evaluate(model, "depth")["rmse"], mean_depth_baseline(model)
    print(f"\nlatent_scale 0.18215: depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}")
    assert rmse < 0.8 * baseline, f"depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}"
