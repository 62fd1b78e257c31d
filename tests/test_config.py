"""Config: schema typing, overrides, derived accumulation, and the one-line exit-2 errors."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from vpd_ray.config import ConfigError, grad_accum_steps, load, task_metric
from vpd_ray.engine.optim import lr_factor

SAMPLE = "configs/sample.yaml"


def test_sample_config_loads_typed():
    cfg = load(SAMPLE)
    assert cfg.tasks.depth.crop_size == [128, 128]  # typed by DepthConfig, defaults merged
    assert cfg.tasks.depth.max_depth == 10.0
    assert cfg.model.backbone.source == "tiny"
    assert cfg.tasks.depth.train_shards.startswith("/")  # made absolute on the driver
    assert task_metric(cfg) == ("depth/rmse", "min")
    assert grad_accum_steps(cfg) == 1  # 8 = 4 per worker x 2 workers


def test_overrides_and_accumulation():
    cfg = load(SAMPLE, ["train.global_batch_size=24", "tasks.depth.batch_size=3", "scaling.num_workers=4"])
    assert grad_accum_steps(cfg) == 2  # 24 = 3 x 4 workers x 2


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.bogus=1"], "train.bogus"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["tasks.depth.crop_szie=[64,64]"], "crop_szie"),
        (["tasks.nosuchtask.batch_size=1"], "nosuchtask"),
        (["tasks.depth.train_shards=/nowhere/x-{0..3}.tar"], "/nowhere/x-0.tar"),
        (["model.backbone.source=pretrained", "model.backbone.path=/nowhere/sd15"], "/nowhere/sd15"),
        (["train.global_batch_size=10"], "not divisible"),
        (["deepspeed.zero_stage=4"], "zero_stage"),
        (["train.nan_policy=ignore"], "nan_policy"),
        (["train.grad_checkpointing=true", "deepspeed.zero_stage=3"], "zero_stage 3"),
    ],
)
def test_bad_config_names_key(override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("{", r"\{")):
        load(SAMPLE, override)


def test_hub_id_is_not_checked_as_path():
    cfg = load(SAMPLE, ["model.backbone.source=pretrained", "model.backbone.path=stable-diffusion-v1-5/stable-diffusion-v1-5"])
    assert cfg.model.backbone.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("module", ["vpd_ray.train", "vpd_ray.evaluate"])
def test_cli_bad_config_exits_2_with_one_line(module):
    args = [sys.executable, "-m", module, SAMPLE, "train.max_steps=abc"]
    if module == "vpd_ray.evaluate":
        args = [sys.executable, "-m", module, SAMPLE, "--checkpoint", "/nowhere", "train.max_steps=abc"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.max_steps" in lines[0], proc.stderr


def test_vpd_depth_schedule_matches_reference():
    """VPD depth: 3e-5 -> 5e-4 as t**0.9 over the first half, then back (reference formula)."""
    sched = OmegaConf.create({"kind": "poly_rise_fall", "power": 0.9, "min_lr": 3e-5, "peak_fraction": 0.5,
                              "warmup_steps": 0, "warmup_ratio": 1e-6})
    lr, total, half = 5e-4, 1000, 500
    for step in (0, 100, 250, 500, 600, 900, 1000):
        if step < half:
            ref = (lr - 3e-5) * (step / half) ** 0.9 + 3e-5
        else:
            ref = max(3e-5, (3e-5 - lr) * (step / half - 1) ** 0.9 + lr)
        assert lr * lr_factor(step, total, sched, lr) == pytest.approx(ref, rel=1e-9)


def test_warmup_poly_schedule():
    sched = OmegaConf.create({"kind": "warmup_poly", "power": 1.0, "min_lr": 0.0, "peak_fraction": 0.5,
                              "warmup_steps": 100, "warmup_ratio": 1e-6})
    assert lr_factor(0, 1000, sched, 1.0) == pytest.approx(1e-6)
    assert lr_factor(100, 1000, sched, 1.0) == pytest.approx(0.9)
    assert lr_factor(1000, 1000, sched, 1.0) == pytest.approx(0.0)


def test_nan_policy_names_the_step():
    from vpd_ray.engine.loop import check_nan_policy

    check_nan_policy(2, "skip", 3, step=7, task_name="depth")  # skipped, no error
    with pytest.raises(FloatingPointError, match="step 7 .task depth.*nan_policy=stop"):
        check_nan_policy(1, "stop", 3, step=7, task_name="depth")
    with pytest.raises(FloatingPointError, match="step 9 .*4 batch.es. skipped.*max_nan_skips=3"):
        check_nan_policy(4, "skip", 3, step=9, task_name="depth")


def test_param_groups_split_unet_and_no_decay():
    from torch import nn

    from vpd_ray.engine.optim import param_groups

    model = nn.ModuleDict({"unet": nn.Linear(4, 4), "head": nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)),
                           "vae": nn.Linear(4, 4)})
    model["vae"].requires_grad_(False)
    groups = {g["group_name"]: g for g in param_groups(model.named_parameters(), 1e-3, 0.1, 0.01)}
    assert set(groups) == {"unet", "unet_no_decay", "other", "other_no_decay"}
    assert groups["unet"]["lr"] == pytest.approx(1e-5) and groups["unet"]["weight_decay"] == 0.1
    assert groups["other_no_decay"]["weight_decay"] == 0.0 and len(groups["other_no_decay"]["params"]) == 3
    frozen = {id(p) for p in model["vae"].parameters()}
    assert not any(id(p) in frozen for g in groups.values() for p in g["params"])
