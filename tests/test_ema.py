"""EMA of the trainable weights (``train.ema_decay``, ``train.ema_eval``; issue #15 item 4).

The formula and the switch are checked on the plain-torch engine; the product's wiring (validation,
full checkpoints, resume, export) on the real :class:`vpd_ray.engine.loop.Trainer` run in this process:
DeepSpeed ZeRO-2 bf16, world size 1 over gloo, Ray Train's context, checkpoint and report faked, on
16 synthetic 64x64 depth samples (one data epoch = two optimizer steps, so a checkpoint at step 2 is
an epoch boundary and a resumed run sees exactly the uninterrupted run's batches).
"""

from __future__ import annotations

import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

from vpd_ray.config import ConfigError, compose, load, load_or_exit, validate
from vpd_ray.engine import checkpoint as ckpt
from vpd_ray.engine import ema as ema_lib
from vpd_ray.engine.optim import param_groups
from vpd_ray.engine.step import Stepper, TorchEngine
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.modeling import VPDModel
from vpd_ray.tasks.depth import DepthConfig, DepthTask

STEPS, CHECKPOINT_AT, DECAY = 4, 2, 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model on one intra-op thread: a second one costs more than it brings on 2 cores."""
    from learning_loop import one_thread

    with one_thread():
        yield


# --- the plain-torch engine: formula, switch, swap ---------------------------------------------
def _depth_model(tiny_backbone_config) -> VPDModel:
    torch.manual_seed(0)
    task = DepthTask(DepthConfig(head_dim=16, crop_size=[64, 64], eigen_crop=False))
    return VPDModel(VPDBackbone.from_config(tiny_backbone_config), {"depth": task}).train()


def _stepper(model, ema=None) -> Stepper:
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-2, 0.01, 0.1))
    return Stepper(TorchEngine(model, optimizer), model.tasks, model.backbone.encode, ema=ema)


def _batches(count: int):
    gen = torch.Generator().manual_seed(0)
    return {"depth": iter([{"image": torch.rand(2, 3, 64, 64, generator=gen), "class_id": torch.tensor([3, -1]),
                            "depth": torch.rand(2, 1, 64, 64, generator=gen) * 5 + 0.5} for _ in range(count)])}


def test_off_by_default_keeps_no_state_and_ema_only_observes(tiny_backbone_config):
    cfg = compose("configs/sample.yaml")
    assert cfg.train.ema_decay == 0.0 and cfg.train.ema_eval is False  # VPD's: no EMA
    off, on = _depth_model(tiny_backbone_config), _depth_model(tiny_backbone_config)
    assert ema_lib.build(off, 0.0) is None and _stepper(off).ema is None  # nothing kept, nothing run
    stepper_off, average = _stepper(off), ema_lib.build(on, 0.9)
    stepper_on = _stepper(on, average)
    iters_off, iters_on = _batches(3), _batches(3)
    for step in range(3):
        stepper_off.step(step, iters_off)
        stepper_on.step(step, iters_on)
        with average.swapped():  # validation under ema_eval: the average in, the raw weights back after
            pass
    raw_off, raw_on = off.state_dict(), on.state_dict()
    assert all(torch.equal(raw_off[k], raw_on[k]) for k in raw_off)  # bit for bit: the EMA never perturbs training


def test_ema_is_the_formula_over_the_trainable_weights_and_swaps_in(tiny_backbone_config):
    model = _depth_model(tiny_backbone_config)
    average = ema_lib.build(model, 0.9)
    trained = {id(p) for g in param_groups(model.named_parameters(), 1e-2, 0.01, 0.1) for p in g["params"]}
    assert {id(p) for p in average.params.values()} == trained  # exactly what the optimizer trains
    assert not any(name.startswith("backbone.vae.") for name in average.shadow)  # the frozen VAE is not in it
    assert all(t.dtype == torch.float32 for t in average.shadow.values())
    name = "heads.depth.last_layer_depth.2.weight"
    param = dict(model.named_parameters())[name]
    expected = param.detach().double().clone()
    stepper, iters = _stepper(model, average), _batches(3)
    for step in range(3):
        stepper.step(step, iters)
        expected = 0.9 * expected + 0.1 * param.detach().double()  # by hand, in float64
    got = average.shadow[name].double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (got - param.detach().double()).abs().max() > 1e-4  # really an average, not the weights
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.swapped():
        assert torch.equal(param.detach(), average.shadow[name])  # fp32 model: exactly the EMA
    assert all(torch.equal(p.detach(), raw[n]) for n, p in model.named_parameters())  # raw weights back


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["train.ema_decay=1.0"], "train.ema_decay: 1.0 must be in [0, 1)"),
    (["train.ema_decay=-0.1"], "train.ema_decay: -0.1 must be in [0, 1)"),
    (["train.ema_decay=nan"], "train.ema_decay: nan must be in [0, 1)"),
    (["train.ema_eval=true"], "train.ema_eval: true needs train.ema_decay > 0"),
    (["train.ema_decay=0.999", "deepspeed.zero_stage=3"], "train.ema_decay: not supported with deepspeed.zero_stage 3"),
])  # fmt: skip
def test_bad_values_are_one_line_config_errors(overrides, words, capsys):
    cfg = compose("configs/sample.yaml", overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit:
        load_or_exit("configs/sample.yaml", overrides)
    assert exit.value.code == 2 and capsys.readouterr().err.strip() == f"config error: {err.value}"


def test_good_values_load_and_a_wrong_type_is_refused():
    cfg = load("configs/sample.yaml", ["train.ema_decay=0.999", "train.ema_eval=true"])
    assert cfg.train.ema_decay == 0.999 and cfg.train.ema_eval is True
    with pytest.raises(ConfigError, match="train.ema_decay"):
        compose("configs/sample.yaml", ["train.ema_decay=high"])  # by the schema's type


# --- the product's trainer, in this process ------------------------------------------------------
class _Context:
    """Ray Train's context for one worker; its storage is the local folder ``experiment``."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def get_storage(self):
        import types

        import pyarrow.fs

        return types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=self.experiment)

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def world(process_group, tmp_path_factory):
    """``trainer(name, overrides, resume=None, run=True)``: a Trainer of configs/sample.yaml on 16 synthetic
    samples (4 steps, a checkpoint every 2), run to its end; its checkpoints land in ``<root>/<name>/``."""
    from vpd_ray.data import synth
    from vpd_ray.data.writer import write_shards
    from vpd_ray.engine import loop

    root = tmp_path_factory.mktemp("ema")
    write_shards(synth.synth_items("depth", 16, 0, hw=(64, 64)), str(root / "shards"), "depth-train", max_count=16)
    write_shards(synth.synth_items("depth", 4, 1, hw=(64, 64)), str(root / "shards"), "depth-val", max_count=16)

    def trainer(name: str, overrides=(), resume: str | None = None, run: bool = True):
        import ray.train

        cfg = load("configs/sample.yaml", [
            f"run.storage_path={root}/runs", "run.name=ema", f"tasks.depth.train_shards={root}/shards/depth-train-000000.tar",
            f"tasks.depth.val_shards={root}/shards/depth-val-000000.tar", "tasks.depth.crop_size=[64,64]",
            "tasks.depth.head_dim=16", "tasks.depth.eval_batch_size=4", "scaling.num_workers=1", "data.num_workers=0",
            f"train.max_steps={STEPS}", f"train.val_every={CHECKPOINT_AT}", "train.max_val_batches=1",
            "train.log_images=0", *overrides])  # fmt: skip

        def report(metrics, checkpoint, checkpoint_dir_name):  # Ray Train's persisting copy
            shutil.copytree(checkpoint.path, root / name / checkpoint_dir_name)

        found = ray.train.Checkpoint.from_directory(resume) if resume else None
        with mock.patch.object(ray.train, "get_context", lambda: _Context(str(root / name))), \
                mock.patch.object(ray.train, "report", report), \
                mock.patch.object(ray.train, "get_checkpoint", lambda: found), \
                mock.patch.object(loop.Trainer, "_worker_nodes", lambda self: ["this node"]):
            made = loop.Trainer(cfg, {})
            made.run() if run else made.restore()
        return made

    return root, trainer


@pytest.fixture(scope="module")
def runs(world):
    """An EMA run straight to step 4, the same resumed from its step-2 checkpoint, and a run without EMA."""
    root, trainer = world
    on = ["train.ema_decay=0.5", "train.ema_eval=true"]
    return {"straight": trainer("straight", on),
            "resumed": trainer("resumed", on, resume=str(root / "straight" / "checkpoint_00000002")),
            "off": trainer("off")}


def _ema_file(root, name: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / name / f"checkpoint_{step:08d}" / ckpt.EMA))


def _raw(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in trainer.engine.module.named_parameters()}


def test_trainer_without_ema_is_unchanged(world, runs):
    root, _ = world
    off, on = runs["off"], runs["straight"]
    assert off.ema is None and off.stepper.ema is None
    for step in (CHECKPOINT_AT, STEPS):
        files = os.listdir(root / "off" / f"checkpoint_{step:08d}")
        assert ckpt.EMA not in files and ckpt.EMA in os.listdir(root / "straight" / f"checkpoint_{step:08d}")
    raw_off, raw_on = _raw(off), _raw(on)
    assert all(torch.equal(raw_off[k], raw_on[k]) for k in raw_off)  # EMA + ema_eval validations: same training


def test_resumed_run_has_the_uninterrupted_runs_ema(world, runs):
    root, _ = world
    events = (root / "runs" / "ema" / "events.log").read_text()
    assert f"resuming from checkpoint {root / 'straight' / 'checkpoint_00000002'} at step 2" in events
    straight, resumed = _ema_file(root, "straight", STEPS), _ema_file(root, "resumed", STEPS)
    assert set(straight) == set(runs["straight"].ema.shadow) and not any(".vae." in n for n in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.equal(straight[k], runs["straight"].ema.shadow[k].cpu()) for k in straight)  # the file is the state
    at_2, raw = _ema_file(root, "straight", CHECKPOINT_AT), _raw(runs["straight"])
    assert any(not torch.equal(at_2[k], straight[k]) for k in straight)  # it moved after the checkpoint
    assert any(not torch.equal(straight[k], raw[k]) for k in straight)  # and is not the raw weights


def test_resume_on_another_worker_count_keeps_the_ema(world, runs):
    """Saved by 2 workers (meta.json says so): consolidated weights, a fresh optimizer, the EMA as saved."""
    root, trainer = world
    copy = root / "elastic" / "checkpoint_00000002"
    shutil.copytree(root / "straight" / "checkpoint_00000002", copy)
    meta = json.loads((copy / ckpt.META).read_text())
    (copy / ckpt.META).write_text(json.dumps({**meta, "world_size": 2}))
    moved = trainer("moved", ["train.ema_decay=0.5", "train.ema_eval=true"], resume=str(copy), run=False)
    saved = _ema_file(root, "straight", CHECKPOINT_AT)
    assert all(torch.equal(moved.ema.shadow[k].cpu(), saved[k]) for k in saved)
    # EMA switched on when resuming a run saved without one: it starts at the resumed weights.
    started = trainer("started", ["train.ema_decay=0.5"], resume=str(root / "off" / "checkpoint_00000002"), run=False)
    raw = _raw(started)
    assert all(torch.equal(started.ema.shadow[k], raw[k]) for k in started.ema.shadow)
    events = (root / "runs" / "ema" / "events.log").read_text()
    assert "(saved by 2)" in events and "the checkpoint has no EMA: it starts at the resumed weights" in events


def test_validation_and_export_use_the_ema(world, runs, tmp_path):
    from safetensors.torch import load_file

    root, _ = world
    trainer = runs["straight"]
    raw, params = _raw(trainer), dict(trainer.engine.module.named_parameters())
    name = next(n for n, v in trainer.ema.shadow.items() if not torch.equal(v.to(params[n].dtype).float(), raw[n]))
    seen = []
    with mock.patch.object(trainer, "_validate", lambda: seen.append(params[name].detach().clone()) or {}):
        trainer.validate()  # ema_eval: the engine's module holds the EMA (in bf16) while the tasks are scored
        trainer.cfg.train.ema_eval = False
        try:
            trainer.validate()
        finally:
            trainer.cfg.train.ema_eval = True
    assert torch.equal(seen[0], trainer.ema.shadow[name].to(seen[0].dtype)) and torch.equal(seen[1].float(), raw[name])
    assert trainer.validate()["depth/samples"] == 4  # a real validation through the engine, on the EMA
    assert all(torch.equal(p.detach().float(), raw[n]) for n, p in params.items())  # the raw weights back
    trainer.save_weights()  # a weights-only package: the EMA too, in the training dtype
    light = load_file(str(root / "runs" / "ema" / "weights" / f"step_{STEPS:08d}" / "model.safetensors"))
    assert all(torch.equal(light[k], v.to(torch.bfloat16)) for k, v in trainer.ema.shadow.items())
    package = ckpt.export_checkpoint(str(root / "straight" / f"checkpoint_{STEPS:08d}"), str(tmp_path / "pkg"))
    weights, average = load_file(os.path.join(package, "model.safetensors")), _ema_file(root, "straight", STEPS)
    assert all(torch.equal(weights[k], average[k]) for k in average)  # the EMA in place of the raw weights
    frozen = [k for k in weights if k.startswith("backbone.vae.")]
    assert frozen and all(torch.equal(weights[k], trainer.frozen[k]) for k in frozen)
    # The same checkpoint with ema_eval off in its config: the trained weights (the fp32 masters).
    copy = tmp_path / "raw_ckpt"
    shutil.copytree(root / "straight" / f"checkpoint_{STEPS:08d}", copy)
    config = (copy / ckpt.CONFIG).read_text()
    assert config.count("ema_eval: true") == 1
    (copy / ckpt.CONFIG).write_text(config.replace("ema_eval: true", "ema_eval: false"))
    masters = ckpt.consolidated_state_dict(str(copy))
    raw_weights = load_file(os.path.join(ckpt.export_checkpoint(str(copy), str(tmp_path / "raw")), "model.safetensors"))
    assert all(torch.equal(raw_weights[k], masters[k]) for k in raw_weights)
    assert any(not torch.equal(raw_weights[k], average[k]) for k in average)


# --- learning with the EMA -----------------------------------------------------------------------
@pytest.mark.slow
def test_depth_learns_with_ema_weights_below_the_mean_depth_baseline():
    """60 steps of the product's stepper on the synthetic depth samples (about 25 s on 2 cores)."""
    from learning_loop import build, evaluate, one_thread, sample_urls
    from test_multitask import DEPTH_TINY, mean_depth_baseline

    from vpd_ray.data.pipeline import build_stream

    model = build({"depth": DepthTask(DepthConfig(**DEPTH_TINY))})
    task = model.tasks["depth"]
    iters = {"depth": iter(build_stream(sample_urls("depth", "train"), task.train_transform, train=True, batch_size=4,
                                        seed=0, fields=task.fields, num_workers=0, shuffle_buffer=64))}
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-3, 0.01, 0.1))
    average = ema_lib.build(model, 0.9)
    stepper = Stepper(TorchEngine(model, optimizer, grad_clip=1.0), model.tasks, model.backbone.encode, ema=average)
    with one_thread():
        losses = [float(stepper.step(step, iters)) for step in range(60)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    raw = evaluate(model, "depth")["rmse"]
    with average.swapped():
        rmse = evaluate(model, "depth")["rmse"]
    baseline = mean_depth_baseline(model)
    print(f"\ndepth RMSE with EMA weights {rmse:.3f} (raw {raw:.3f}) vs mean-depth baseline {baseline:.3f}")
    assert rmse != raw and rmse < 0.85 * baseline, f"EMA depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}"
