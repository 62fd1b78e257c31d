"""The authors' released ADE20K (mmseg ``VPDSeg``) and RefCOCO (``VPDRefer``) checkpoint layouts, written
here from the tiny sample models, loaded through the loader evaluation uses."""

from __future__ import annotations

import argparse
import types

import pytest
import torch

from vpd_ray.config import compose
from vpd_ray.engine.eval_job import load_model
from vpd_ray.model.authors_weights import (
    load_authors_checkpoint,
    remap_authors_state_dict,
)
from vpd_ray.modeling import build_model

CONFIGS = {"seg": "configs/sample_seg.yaml", "refer": "configs/sample_refer.yaml"}
# ldm DDPM.register_schedule's persistent buffers, which VPDSeg's emptied sd_model keeps
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2")  # fmt: skip
DROPPED = {"seg": 4 + 2 + len(SCHEDULE), "refer": 4 + 2}  # UNet out.{0,2}.{weight,bias}, post_quant_conv, schedule


def seg_head_to_authors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``heads.seg.*`` -> mmseg's FPN neck / FPNHead keys (ConvModule: ``conv``, ``bn``)."""
    layers = {"0": "conv", "1": "bn"}
    out = {}
    for key, value in state.items():
        if not key.startswith("heads.seg."):
            continue
        part, rest = key[len("heads.seg.") :].split(".", 1)
        if part == "neck":  # lateral_convs.0.weight -> lateral_convs.0.conv.weight
            kind, i, name = rest.split(".")
            out[f"neck.{kind}.{i}.conv.{name}"] = value
        elif rest.startswith("scale_heads."):  # scale_heads.i.j.{0: conv, 1: bn}.name
            _, i, j, layer, name = rest.split(".")
            out[f"decode_head.scale_heads.{i}.{j}.{layers[layer]}.{name}"] = value
        else:
            assert rest.startswith("conv_seg."), key
            out[f"decode_head.{rest}"] = value
    return out


def refer_head_to_authors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``heads.refer.*`` -> LAVT's SimpleDecoding keys under ``classifier.``."""
    names = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"}
    out = {}
    for key, value in state.items():
        if not key.startswith("heads.refer."):
            continue
        block, rest = key[len("heads.refer.") :].split(".", 1)
        if block == "classifier":
            out[f"classifier.conv1_1.{rest}"] = value
        else:  # fuse4.3.weight -> classifier.conv2_4.weight
            layer, name = rest.split(".", 1)
            out[f"classifier.{names[layer]}_{block[-1]}.{name}"] = value
    return out


def authors_state(model, task: str, embeddings_3d: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of the authors' model for ``model``'s weights, with what they keep and VPD never uses."""
    from sd_layout import vpd_backbone_to_authors

    sd = model.state_dict()
    class_set = model.tasks["seg"].cfg.class_set if task == "seg" else None
    out = vpd_backbone_to_authors(sd, class_set=class_set, embeddings_3d=embeddings_3d)
    out.update(seg_head_to_authors(sd) if task == "seg" else refer_head_to_authors(sd))
    c0 = model.backbone.unet.config.block_out_channels[0]
    for layer, shape in (("0", (c0,)), ("2", (4, c0, 3, 3))):
        out[f"unet.unet.diffusion_model.out.{layer}.weight"] = torch.ones(shape)
        out[f"unet.unet.diffusion_model.out.{layer}.bias"] = torch.zeros(shape[0])
    out["encoder_vq.post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    out["encoder_vq.post_quant_conv.bias"] = torch.zeros(4)
    if task == "seg":
        out.update({f"sd_model.{name}": torch.rand(10) for name in SCHEDULE})
    return {k: v.clone() for k, v in out.items()}


def authors_file(task: str, state: dict[str, torch.Tensor]) -> dict:
    """What each release's training code saves: mmcv's checkpoint, refer/train.py's dict."""
    if task == "seg":
        meta = {"mmcv_version": "1.7.1", "time": "Thu Mar  2 12:00:00 2023", "iter": 80000,
                "CLASSES": ("wall", "floor"), "PALETTE": [[120, 120, 120], [4, 200, 3]]}  # fmt: skip
        return {"meta": meta, "state_dict": state}
    args = argparse.Namespace(token_length=8, lr=5e-5, img_size=128, model_id="refcoco")
    return {"model": state, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
            "epoch": 39, "args": args, "lr_scheduler": {"base_lrs": [5e-5], "last_epoch": 9, "lr_lambdas": [None]}}


def _perturb(model) -> None:
    """Stand-in for trained weights: every tensor moved off what a fresh build of the config gives."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.add_(3)
            elif name.endswith("running_var"):
                t.mul_(1.5)
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
            if name.startswith("backbone.class_embeddings."):
                t[-1] = t[:-1].mean(0)  # ClassEmbeddings' last row is the mean of the others


@pytest.fixture(scope="module", params=["seg", "refer"])
def case(request):
    cfg = compose(CONFIGS[request.param])
    source = build_model(cfg).eval()
    _perturb(source)
    return request.param, cfg, source


def _batch(model, task: str) -> dict[str, torch.Tensor]:
    batch = {"image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))}
    if task == "refer":
        batch["input_ids"] = model.tasks["refer"].tokenize(["the red circle on the left"])
    return batch


def test_evaluation_loads_the_released_layout(tmp_path, case, capsys):
    task, cfg, source = case
    path = tmp_path / f"vpd_{task}.pth"
    torch.save(authors_file(task, authors_state(source, task)), path)
    loaded = load_model(cfg, str(path))  # what `python -m vpd_ray.evaluate CONFIG --checkpoint FILE` runs
    assert f"dropped {DROPPED[task]}" in capsys.readouterr().out
    want, got = source.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(task, _batch(loaded, task)), source(task, _batch(source, task)))


def test_report_accounts_for_every_key(case):
    task, _, source = case
    state = authors_state(source, task, embeddings_3d=True)  # seg: class embeddings [N, 1, D]
    unet, vae = source.backbone.unet.config, source.backbone.vae.config
    class_set = "synth_seg" if task == "seg" else None
    mapped, report = remap_authors_state_dict(state, task, unet, vae, class_set=class_set)
    assert set(report.mapped) | set(report.dropped) == set(state) and not set(report.mapped) & set(report.dropped)
    assert len(report.dropped) == DROPPED[task] and len(report.mapped) == len(state) - DROPPED[task]
    want = source.state_dict()
    assert set(mapped) == set(want) and all(torch.equal(mapped[k], want[k]) for k in want)
    assert report.mapped["unet.unet.diffusion_model.input_blocks.1.0.in_layers.0.weight"] == (
        "backbone.unet.down_blocks.0.resnets.0.norm1.weight")
    assert report.mapped["gamma"] == "backbone.text_adapter.gamma"
    assert "post_quant_conv" in report.dropped["encoder_vq.post_quant_conv.bias"]
    if task == "seg":
        assert report.mapped["class_embeddings"] == "backbone.class_embeddings.synth_seg.weight"
        assert report.mapped["decode_head.scale_heads.3.2.bn.running_var"] == "heads.seg.head.scale_heads.3.2.1.running_var"
        assert report.mapped["neck.fpn_convs.1.conv.bias"] == "heads.seg.neck.fpn_convs.1.bias"
        assert "noise-schedule" in report.dropped["sd_model.betas"]
    else:
        assert report.mapped["classifier.conv2_3.weight"] == "heads.refer.fuse3.3.weight"
        assert report.mapped["classifier.bn1_2.num_batches_tracked"] == "heads.refer.fuse2.1.num_batches_tracked"
        assert report.mapped["classifier.conv1_1.bias"] == "heads.refer.classifier.bias"


def test_a_ddp_prefix_on_every_key_is_taken_off(case):
    task, _, source = case  # the authors' depth/test.py strips "module." the same way
    state = {f"module.{k}": v for k, v in authors_state(source, task).items()}
    unet, vae = source.backbone.unet.config, source.backbone.vae.config
    mapped, report = remap_authors_state_dict(state, task, unet, vae, class_set="synth_seg")
    assert set(mapped) == set(source.state_dict()) and set(report.mapped) | set(report.dropped) == set(state)
    state["module.decode_head.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys .*\(1\): \['module.decode_head.extra'\]"):
        remap_authors_state_dict(state, task, unet, vae, class_set="synth_seg")


UNEXPECTED = {"seg": ("decode_head.conv_seg.extra", "sd_model.model_ema.decay"),
              "refer": ("classifier.conv3_4.weight", "text_encoder.weight")}  # fmt: skip
MISSING = {"seg": ("decode_head.conv_seg.bias", "heads.seg.head.conv_seg.bias"),
           "refer": ("classifier.bn2_2.running_var", "heads.refer.fuse2.4.running_var")}  # fmt: skip


def test_unexpected_and_missing_keys_are_errors_naming_them(tmp_path, case):
    task, _, source = case
    state = authors_state(source, task)
    for key in UNEXPECTED[task]:
        state[key] = torch.zeros(1)
    unet, vae = source.backbone.unet.config, source.backbone.vae.config
    first, second = sorted(UNEXPECTED[task])
    with pytest.raises(ValueError, match=rf"unexpected keys in the VPD {task} checkpoint \(2\): .*{first}.*{second}"):
        remap_authors_state_dict(state, task, unet, vae, class_set="synth_seg")
    state = authors_state(source, task)
    del state[MISSING[task][0]]
    torch.save(authors_file(task, state), tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=rf"does not fit the model: missing \['{MISSING[task][1]}'\]"):
        load_authors_checkpoint(str(tmp_path / "partial.pth"), source)  # fails before loading anything


class NotAllowed:
    pass


def test_wrong_files_are_errors_naming_the_problem(tmp_path, case):
    task, _, source = case
    entry, other, owner = ("state_dict", "model", "depth / refer") if task == "seg" else ("model", "state_dict", "seg")
    torch.save({other: {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=rf"with a '{entry}' entry, got \['{other}'\] "
                                         rf"\(that is how the authors' {owner} checkpoint"):
        load_authors_checkpoint(str(tmp_path / "other.pth"), source)
    torch.save({entry: {"encoder.unet.unet.diffusion_model.x": torch.zeros(1)}}, tmp_path / "depth_like.pth")
    with pytest.raises(ValueError, match=r"no key starts with 'unet.unet.diffusion_model.'.*authors' depth checkpoint"):
        load_authors_checkpoint(str(tmp_path / "depth_like.pth"), source)
    torch.save({entry: {}, "extra": NotAllowed()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match=r"weights_only=True: Unsupported global: .*NotAllowed"):
        load_authors_checkpoint(str(tmp_path / "unsafe.pth"), source)


def test_the_task_picks_the_layout_and_a_multitask_model_must_name_one():
    multitask = types.SimpleNamespace(tasks={"depth": object(), "seg": object()})
    with pytest.raises(ValueError, match=r"holds one task, this model has \['depth', 'seg'\]: name the head"):
        load_authors_checkpoint("unused.pth", multitask)
    depth_named_seg = types.SimpleNamespace(tasks={"seg": types.SimpleNamespace(name="depth")})
    with pytest.raises(ValueError, match="task 'seg' is a depth task: the VPD seg checkpoint layout does not fit"):
        load_authors_checkpoint("unused.pth", depth_named_seg, layout="seg")
