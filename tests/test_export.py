"""Streaming export and shared consolidation: same bytes as the in-memory path, checks before writing.

The slow tests write real ZeRO-0/2/3 checkpoints with DeepSpeed (2 gloo processes, one AdamW step,
the sample config's tiny model) and compare ``vpd_ray.export`` with the export it replaced
(``vpd_ray.benchmarks.export.in_memory_export``), and ``evaluate`` of a checkpoint directory with
``evaluate`` of its package.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vpd_ray.modeling import architecture, build_model
from vpd_ray.package import WEIGHTS, export_package, load_package, write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(REPO, "configs", "sample.yaml")


class Lazy:
    """A lazy tensor as the exporter sees DeepSpeed's: ``shape`` now, values from ``contiguous()``."""

    def __init__(self, tensor, fail=False):
        self.shape, self._tensor, self._fail = tensor.shape, tensor, fail

    def contiguous(self):
        if self._fail:
            raise OSError("shard unreadable")
        return self._tensor.contiguous()


def test_write_safetensors_has_save_files_bytes(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7, dtype=torch.bfloat16),  # cast to fp32, like every entry
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(2, 0, 3),
        "count": torch.tensor(4, dtype=torch.int64),
        "strided": torch.randn(4, 6)[:, ::2],
        "ünïcode": torch.ones(1),
    }
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "vpd_ray"})
    write_safetensors(str(tmp_path / "ours.safetensors"), {k: Lazy(v) for k, v in tensors.items()},
                      metadata={"format": "vpd_ray"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v.float()) for k, v in tensors.items())
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "ref.safetensors"]  # no temp file left


@pytest.fixture(scope="module")
def tiny():
    from vpd_ray.config import compose, to_yaml

    cfg = compose(SAMPLE_CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg)
    return model.state_dict(), to_yaml(cfg), architecture(model)


def test_export_package_round_trips(tiny, tmp_path):
    state, config_yaml, arch = tiny
    export_package({k: Lazy(v) for k, v in state.items()}, config_yaml, arch, str(tmp_path / "pkg"))
    model, _ = load_package(str(tmp_path / "pkg"))
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in state.items())


def test_misfit_weights_are_one_line_and_no_package(tiny, tmp_path):
    state, config_yaml, arch = tiny
    bad = dict(state)
    del bad["heads.depth.last_layer_depth.2.weight"]
    bad["heads.depth.mystery"] = torch.zeros(1)
    bad["backbone.unet.conv_in.weight"] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError) as err:
        export_package(bad, config_yaml, arch, str(tmp_path / "pkg"))
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing ['heads.depth.last_layer_depth.2.weight']" in message
    assert "1 unexpected ['heads.depth.mystery']" in message
    assert "1 mis-shaped ['backbone.unet.conv_in.weight (1, 2, 3) vs (32, 4, 3, 3)']" in message
    assert not (tmp_path / "pkg").exists()  # checked before anything is written


def test_failed_write_leaves_no_weights(tiny, tmp_path):
    state, config_yaml, arch = tiny
    lazy = {k: Lazy(v, fail=k == "heads.depth.last_layer_depth.2.weight") for k, v in state.items()}
    with pytest.raises(OSError, match="shard unreadable"):
        export_package(lazy, config_yaml, arch, str(tmp_path / "pkg"))
    assert WEIGHTS not in os.listdir(tmp_path / "pkg")
    assert not [n for n in os.listdir(tmp_path / "pkg") if n.startswith(WEIGHTS)]  # nor its temp file
    with pytest.raises(FileNotFoundError, match="model.safetensors missing"):
        load_package(str(tmp_path / "pkg"))


# --- real DeepSpeed checkpoints -----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{stage: checkpoint dir}`` of the sample model after one step, ZeRO 0, 2 and 3, 2 ranks."""
    from vpd_ray.benchmarks.export import write_checkpoint
    from vpd_ray.config import load

    root = tmp_path_factory.mktemp("zero_checkpoints")
    return {stage: write_checkpoint(load(SAMPLE_CONFIG, [f"deepspeed.zero_stage={stage}"]), str(root / f"zero{stage}"))
            for stage in (0, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_streamed_export_equals_in_memory_export(checkpoints, stage, tmp_path):
    """Same bytes as the export before streaming (DeepSpeed's eager zero_to_fp32), same tensors as
    ``consolidated_state_dict``; the trainable weights are the fp32 masters."""
    from vpd_ray.benchmarks.export import in_memory_export
    from vpd_ray.engine.checkpoint import consolidated_state_dict
    from vpd_ray.engine.checkpoint import export_checkpoint

    old = in_memory_export(checkpoints[stage], str(tmp_path / "old"))
    new = export_checkpoint(checkpoints[stage], str(tmp_path / "new"))
    assert (tmp_path / "new" / WEIGHTS).read_bytes() == (tmp_path / "old" / WEIGHTS).read_bytes()
    weights, state = load_file(os.path.join(new, WEIGHTS)), consolidated_state_dict(checkpoints[stage])
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in weights)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in state.values())
    master = weights["backbone.unet.conv_in.weight"]  # trainable: the fp32 master, not the bf16 module
    assert not torch.equal(master, master.bfloat16().float())
    assert sorted(os.listdir(new)) == sorted(os.listdir(old))
    load_package(new)


@pytest.mark.slow
def test_evaluate_consolidates_a_checkpoint_once(ray_cluster, checkpoints, tmp_path, monkeypatch, capsys):
    """The checkpoint is consolidated by one task, then hidden: the workers only have the object store."""
    import vpd_ray.engine.eval_job as evaluate_module
    from vpd_ray.config import load
    from vpd_ray.engine.checkpoint import export_checkpoint

    checkpoint = checkpoints[2]
    package = export_checkpoint(checkpoint, str(tmp_path / "package"))
    cfg = load(SAMPLE_CONFIG, [f"run.storage_path={tmp_path}", "data.num_workers=0"], need=("test_shards",))
    from_package = evaluate_module.evaluate(cfg, package)

    share, shared, hidden = evaluate_module.share_checkpoint, [], str(tmp_path / "hidden")

    def share_then_hide(path):
        ref = share(path)
        shared.append(path)
        os.rename(checkpoint, hidden)
        return ref

    monkeypatch.setattr(evaluate_module, "share_checkpoint", share_then_hide)
    try:
        from_checkpoint = evaluate_module.evaluate(cfg, checkpoint)
    finally:
        if os.path.isdir(hidden):
            os.rename(hidden, checkpoint)
    assert shared == [checkpoint]
    assert f"consolidated {checkpoint} once" in capsys.readouterr().out
    for key in ("depth/rmse", "depth/d1", "depth/abs_rel"):
        assert from_checkpoint[key] == pytest.approx(from_package[key], rel=1e-6), key
