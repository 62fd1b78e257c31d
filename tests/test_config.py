"""Config: schema typing, overrides, derived accumulation, and the one-line exit-2 errors."""

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from vpd_ray.config import ConfigError, batch_plan, load, task_metric
from vpd_ray.engine.optim import lr_factor

SAMPLE = "configs/sample.yaml"


def test_sample_config_loads_typed():
    cfg = load(SAMPLE)
    assert cfg.tasks.depth.crop_size == [128, 128]  # typed by DepthConfig, defaults merged
    assert cfg.tasks.depth.max_depth == 10.0
    assert cfg.model.backbone.source == "tiny"
    assert cfg.tasks.depth.train_shards.startswith("/")  # made absolute on the driver
    assert task_metric(cfg) == ("depth/rmse", "min")
    assert batch_plan(cfg).accum == 1  # 8 = 4 per worker x 2 workers


def test_overrides_and_accumulation():
    cfg = load(SAMPLE, ["train.global_batch_size=24", "tasks.depth.batch_size=3", "scaling.num_workers=4"])
    assert batch_plan(cfg).accum == 2  # 24 = 3 x 4 workers x 2


@pytest.mark.parametrize("workers, micro, accum", [(1, 3, 8), (2, 3, 4), (3, 2, 4), (4, 3, 2), (6, 2, 2), (8, 3, 1),
                                                   (12, 2, 1), (24, 1, 1)])
def test_reference_global_batch_kept_wherever_reachable(workers, micro, accum):
    from vpd_ray.batching import plan_batches

    plan = plan_batches({"depth": 3}, workers, 24, 5e-4)
    assert (plan.micro["depth"], plan.accum, plan.global_batch, plan.lr) == (micro, accum, 24, 5e-4)


@pytest.mark.parametrize("scaling, lr", [("linear", 5e-4 * 32 / 24), ("sqrt", 5e-4 * (32 / 24) ** 0.5), ("none", 5e-4)])
def test_unreachable_global_batch_takes_the_nearest_and_scales_lr(scaling, lr):
    """NYU on 16 workers: 24 needs 1.5 per worker; 16 and 32 are equally near, the larger micro-batch wins."""
    from vpd_ray.batching import plan_batches

    plan = plan_batches({"depth": 3}, 16, 24, 5e-4, scaling)
    assert (plan.micro["depth"], plan.accum, plan.global_batch) == (2, 1, 32)
    assert plan.lr == pytest.approx(lr) and "not reachable" in plan.reason and f"lr_scaling={scaling}" in plan.reason


def test_multitask_plan_shares_one_accumulation():
    from vpd_ray.batching import plan_batches

    plan = plan_batches({"depth": 2, "seg": 2}, 16, 16, 8e-5)
    assert plan.micro == {"depth": 1, "seg": 1} and plan.accum == 1 and plan.lr == 8e-5


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.bogus=1"], "train.bogus"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["tasks.depth.crop_szie=[64,64]"], "crop_szie"),
        (["tasks.nosuchtask.batch_size=1"], "nosuchtask"),
        (["tasks.depth.train_shards=/nowhere/x-{0..3}.tar"], "/nowhere/x-0.tar"),
        (["model.backbone.source=pretrained", "model.backbone.path=/nowhere/sd15"], "/nowhere/sd15"),
        (["train.global_batch_size=0"], "train.global_batch_size"),
        (["train.lr_scaling=cubic"], "lr_scaling"),
        (["train.checkpoint.weights_every=-1"], "weights_every"),
        (["deepspeed.zero_stage=4"], "zero_stage"),
        (["train.nan_policy=ignore"], "nan_policy"),
        (["model.backbone.latent_scale=0"], "latent_scale must be > 0"),
        (["train.grad_checkpointing=true", "deepspeed.zero_stage=3"], "zero_stage 3"),
    ],
)
def test_bad_config_names_key(override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("{", r"\{")):
        load(SAMPLE, override)


HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_hub_id_offline_and_not_cached_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: True)
    with pytest.raises(ConfigError, match="model.backbone.path: hub id .* not in the local Hugging Face cache.*download"):
        load(SAMPLE, ["model.backbone.source=pretrained", f"model.backbone.path={HUB_ID}"])


def test_hub_id_in_the_cache_passes_offline(monkeypatch, tmp_path):
    """A cache in the hub's layout (what ``python -m vpd_ray.download`` leaves) is enough offline."""
    snapshot = tmp_path / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: True)
    cfg = load(SAMPLE, ["model.backbone.source=pretrained", f"model.backbone.path={HUB_ID}"])
    assert cfg.model.backbone.path == HUB_ID


def test_unreachable_hub_is_an_error(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)
    monkeypatch.setattr("huggingface_hub.model_info", refuse)
    with pytest.raises(ConfigError, match="hub is unreachable .Name or service not known"):
        load(SAMPLE, ["model.backbone.source=pretrained", f"model.backbone.path={HUB_ID}"])


def test_remote_paths_are_left_for_a_worker(tmp_path):
    """Paths only the workers see (a --remote-check prefix, s3://) pass on the driver and are deferred."""
    from vpd_ray.config import deferred_checks

    overrides = ["tasks.depth.train_shards=/cluster-data/nyu-train-{000000..000003}.tar",
                 "tasks.depth.val_shards=s3://bucket/nyu-test-000000.tar"]
    with pytest.raises(ConfigError, match="/cluster-data/nyu-train-000000.tar"):
        load(SAMPLE, overrides)
    cfg = load(SAMPLE, overrides, remote=("/cluster-data",))
    assert [c.key for c in deferred_checks(cfg, remote=("/cluster-data",))] == ["tasks.depth.train_shards",
                                                                               "tasks.depth.val_shards"]


@pytest.mark.slow
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
    from vpd_ray.engine.step import check_nan_policy
    from vpd_ray.errors import NonFiniteLossError

    check_nan_policy(2, "skip", 3, step=7, task_name="depth")  # skipped, no error
    with pytest.raises(NonFiniteLossError, match="step 7 .task depth.*nan_policy=stop"):
        check_nan_policy(1, "stop", 3, step=7, task_name="depth")
    with pytest.raises(NonFiniteLossError, match="step 9 .*4 batch.es. skipped.*max_nan_skips=3"):
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


BAD_TASK_OPTIONS = [
    ("configs/sample.yaml", "tasks.depth.crop_size=[0,128]", "tasks.depth.crop_size must be [height, width] > 0"),
    ("configs/sample_seg.yaml", "tasks.seg.test_mode=bogus", "tasks.seg.test_mode: 'bogus' is not one of"),
    ("configs/sample_refer.yaml", "tasks.refer.text_encoder=null", "tasks.refer.text_encoder: required"),
    ("configs/sample_seg.yaml", "tasks.seg.dropout=abc", "tasks.seg.dropout"),
    ("configs/sample_refer.yaml", "tasks.refer.max_tokens=forty", "tasks.refer.max_tokens"),
]
NO_RAY_CHECK = """import sys
from vpd_ray.train import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print("ray imported" if "ray" in sys.modules else "ray not imported")
    raise
"""


@pytest.mark.parametrize("config, override, words", BAD_TASK_OPTIONS)
def test_bad_task_option_is_a_config_error_on_the_driver(config, override, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        load(config, [override])
    assert "\n" not in str(info.value)


# The command-line proofs (a fresh interpreter each, ~4 s of imports): slow, in CI, not in the fast loop.
@pytest.mark.slow
@pytest.mark.parametrize("config, override, words", BAD_TASK_OPTIONS)
def test_bad_task_option_is_one_line_and_exit_2_before_ray(config, override, words):
    """Task options are typed and checked on the driver (config.task_config): no Ray, no worker."""
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", NO_RAY_CHECK, config, override], capture_output=True, text=True,
                          timeout=120)
    print(f"\n{override}: exit {proc.returncode} after {time.perf_counter() - start:.1f} s")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert proc.stdout.strip().endswith("ray not imported"), proc.stdout


def test_configs_and_packages_with_the_old_key_names_still_load(tmp_path, caplog):
    """A package written before the renames (flip_test, ratio, seg's int crop_size) loads, upgraded."""
    from vpd_ray.config import to_yaml
    from vpd_ray.modeling import architecture, build_model
    from vpd_ray.package import export_package, load_package

    cfg = load("configs/sample_multitask.yaml")
    model = build_model(cfg)
    old = OmegaConf.to_container(cfg)
    depth, seg = old["tasks"]["depth"], old["tasks"]["seg"]
    depth["flip_test"] = depth.pop("test_flip")
    depth["ratio"], seg["ratio"] = depth.pop("batch_share"), seg.pop("batch_share")
    seg["crop_size"] = seg["crop_size"][0]
    old_yaml = OmegaConf.to_yaml(OmegaConf.create(old))
    assert "flip_test" in old_yaml and "batch_share" not in old_yaml
    package = export_package(model.state_dict(), old_yaml, architecture(model), str(tmp_path / "old_package"))
    with caplog.at_level("WARNING", logger="vpd_ray.config"):
        loaded, loaded_cfg = load_package(package)
    assert loaded_cfg.tasks.depth.test_flip is True and loaded_cfg.tasks.seg.crop_size == [128, 128]
    assert loaded_cfg.tasks.depth.batch_share == loaded_cfg.tasks.seg.batch_share == 0.5
    notices = [r.getMessage() for r in caplog.records]
    assert "config notice: tasks.depth.flip_test is deprecated: renamed to test_flip" in notices
    assert any("tasks.seg.crop_size as one int is deprecated" in n for n in notices)
    assert to_yaml(loaded_cfg) == to_yaml(cfg)  # the same resolved config as one written with the new keys


@pytest.mark.parametrize("override, words", [
    ("train.lr=-1", "train.lr: -1.0 must be > 0"),
    ("run.resume=sometimes", "run.resume"),
    ("tasks.depth.batch_share=0", "tasks.depth.batch_share"),
    ("data.max_corrupt=-2", "data.max_corrupt"),
])
def test_values_out_of_range_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load(SAMPLE, [override])


@pytest.mark.slow
def test_invalid_yaml_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  max_steps: [1, 2\n")
    proc = subprocess.run([sys.executable, "-m", "vpd_ray.train", str(bad)], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"config error: {bad}:") and "invalid YAML" in lines[0]


@pytest.mark.parametrize("spec, words", [("EMPTY_DIR", "names no shards"), ("EMPTY_DIR/*.tar", "not found")])
def test_shard_specs_that_name_nothing(tmp_path, spec, words):
    spec = spec.replace("EMPTY_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=words):
        load(SAMPLE, [f"tasks.depth.train_shards={spec}"])


@pytest.mark.slow
def test_evaluate_checkpoint_that_does_not_exist_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "vpd_ray.evaluate", SAMPLE, "--checkpoint", "/nowhere/package"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["config error: --checkpoint: path not found: /nowhere/package"], proc.stderr


def test_elastic_worker_counts_and_placement_are_validated():
    from vpd_ray.config import worker_range

    assert worker_range(load("configs/sample.yaml")) == (2, 2)
    assert worker_range(load("configs/sample.yaml", ["scaling.num_workers=[1,4]"])) == (1, 4)
    for bad in ("[3,2]", "[0,2]", "[1,2,3]", "1.5", "two"):
        with pytest.raises(ConfigError, match="scaling.num_workers"):
            load("configs/sample.yaml", [f"scaling.num_workers={bad}"])
    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        load("configs/sample.yaml", ["scaling.placement_strategy=pack"])
