"""Loading the authors' VPD depth checkpoint layout (written here from a tiny model) into VPDModel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vpd_ray.model.authors_weights import (
    load_vpd_depth_checkpoint,
    remap_vpd_depth_state_dict,
)
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.modeling import VPDModel
from vpd_ray.tasks.depth import DepthConfig, DepthTask


def _model(cfg, seed):
    torch.manual_seed(seed)
    backbone = VPDBackbone.from_config(dataclasses.replace(cfg, seed=seed))
    return VPDModel(backbone, {"depth": DepthTask(DepthConfig(head_dim=16))})


def authors_layout(model, embeddings_3d=False):
    """The authors' ``model`` dict for ``model``'s weights, plus the parts VPD never uses."""
    from sd_layout import vpd_backbone_to_authors

    sd = model.state_dict()
    out = vpd_backbone_to_authors(sd, root="encoder.", class_set="nyu", embeddings_3d=embeddings_3d)
    for key, value in sd.items():
        if key.startswith("heads.depth."):
            key = key[len("heads.depth.") :]
            out[key if key.startswith(("decoder.", "last_layer_depth.")) else f"encoder.{key}"] = value
    # present in the authors' files (or in variants of them) and unused by VPD
    c0 = model.backbone.unet.config.block_out_channels[0]
    out["encoder.unet.unet.diffusion_model.out.0.weight"] = torch.ones(c0)
    out["encoder.unet.unet.diffusion_model.out.2.weight"] = torch.zeros(4, c0, 3, 3)
    out["encoder.encoder_vq.decoder.conv_in.weight"] = torch.zeros(16, 4, 3, 3)
    out["encoder.encoder_vq.post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def source(tiny_backbone_config):
    return _model(tiny_backbone_config, seed=0)


@pytest.mark.parametrize("embeddings_3d", [False, True], ids=["27xD", "27x1xD"])
def test_load_reproduces_the_source_model(tmp_path, source, tiny_backbone_config, embeddings_3d):
    path = tmp_path / "vpd_depth.pth"
    torch.save({"model": authors_layout(source, embeddings_3d)}, path)
    target = _model(tiny_backbone_config, seed=1)
    key = "backbone.unet.conv_in.weight"
    assert not torch.equal(target.state_dict()[key], source.state_dict()[key])  # really different weights
    report = load_vpd_depth_checkpoint(str(path), target)
    want, got = source.state_dict(), target.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    assert len(report.dropped) == 4 and "mapped" in report.summary()
    batch = {"image": torch.rand(1, 3, 128, 128), "class_id": torch.tensor([-1])}
    with torch.no_grad():
        torch.testing.assert_close(target.eval()("depth", batch), source.eval()("depth", batch))


def test_report_accounts_for_every_key(source):
    state = authors_layout(source)
    unet, vae = source.backbone.unet.config, source.backbone.vae.config
    mapped, report = remap_vpd_depth_state_dict(state, unet, vae)
    assert set(report.mapped) | set(report.dropped) == set(state)
    assert not set(report.mapped) & set(report.dropped)
    assert report.mapped["encoder.unet.unet.diffusion_model.input_blocks.1.0.in_layers.0.weight"] == (
        "backbone.unet.down_blocks.0.resnets.0.norm1.weight"
    )
    assert report.mapped["encoder.layer1.0.weight"] == "heads.depth.layer1.0.weight"
    assert "VAE decoder" in report.dropped["encoder.encoder_vq.decoder.conv_in.weight"]
    assert set(mapped) == set(source.state_dict())


def test_unexpected_keys_are_listed(source):
    state = authors_layout(source)
    state["encoder.unet.unet.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    state["encoder.mystery.weight"] = torch.zeros(1)
    unet, vae = source.backbone.unet.config, source.backbone.vae.config
    with pytest.raises(ValueError, match=r"unexpected keys .*\(2\).*encoder.mystery.weight.*input_blocks.99"):
        remap_vpd_depth_state_dict(state, unet, vae)


def test_missing_keys_and_wrong_files_are_errors(tmp_path, source, tiny_backbone_config):
    state = authors_layout(source)
    del state["last_layer_depth.2.weight"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    target = _model(tiny_backbone_config, seed=1)
    missing = r"does not fit the model: missing \['heads.depth.last_layer_depth.2.weight'\]"
    with pytest.raises(ValueError, match=missing):
        load_vpd_depth_checkpoint(str(tmp_path / "partial.pth"), target)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected a dict with a 'model' entry"):
        load_vpd_depth_checkpoint(str(tmp_path / "other.pth"), target)


def test_resume_falls_back_to_the_newest_checkpoint_marked_complete(tmp_path):
    """A checkpoint every rank persisted (marked ``complete``) but Ray Train never registered, because
    the node went before its controller collected the reports, is the restart's; an unmarked one
    (a rank's part may be missing) never is."""
    import json

    import pyarrow.fs

    from vpd_ray.engine import checkpoint as ckpt
    from vpd_ray.engine.loop import _newest_complete

    for step, complete in ((40, True), (80, True), (120, False)):
        folder = tmp_path / f"checkpoint_{step:08d}"
        folder.mkdir()
        (folder / ckpt.META).write_text(json.dumps({"step": step}))
        if complete:
            (folder / ckpt.COMPLETE).write_text("")
    fs = pyarrow.fs.LocalFileSystem()
    assert _newest_complete(fs, str(tmp_path), after=40) == str(tmp_path / "checkpoint_00000080")
    assert _newest_complete(fs, str(tmp_path), after=80) is None  # 120 is not complete
    assert _newest_complete(fs, str(tmp_path / "nothing-yet"), after=-1) is None
