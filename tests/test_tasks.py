"""Registry-wide checks: every registered task trains (forward, backward, finite loss, a gradient for
every trainable parameter) and evaluates (predict + metric) on the tiny backbone, through its real
transforms on synthetic samples; and the channel bookkeeping at SD v1 shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vpd_ray.tasks import get_task, list_tasks

SIZE = 64
# Synthetic render sizes: the refer generator places its shapes at least 12 px apart (room at 128 px).
RENDER_SIZE = {"refer": 128}


def tiny_task_options(name: str, tiny_clip_dir) -> dict:
    """Small options per task; a newly registered task must add its own here."""
    options = {
        "depth": dict(crop_size=[SIZE, SIZE], head_dim=16, eigen_crop=False),
        "seg": dict(num_classes=6, class_set="synth_seg", scale=[4 * SIZE, SIZE], crop_size=[SIZE, SIZE], neck_channels=16,
                    head_channels=8),
        "refer": dict(text_encoder=str(tiny_clip_dir), max_tokens=8, image_size=SIZE, decoder_hidden=16),
    }  # fmt: skip
    if name not in options:
        pytest.fail(f"task {name!r} has no tiny options in tests/test_tasks.py")
    return options[name]


def synthetic_samples(name: str, count: int, fields: tuple[str, ...]) -> list[dict]:
    from vpd_ray.data.decode import decode_sample, wanted_extensions
    from vpd_ray.data.synth import RENDERERS

    wanted = wanted_extensions(fields)
    hw = (RENDER_SIZE.get(name, SIZE),) * 2
    return [decode_sample(RENDERERS[name](0, i, hw), f"k{i}", "synthetic", wanted) for i in range(count)]


@pytest.fixture(params=list_tasks())
def task_and_model(request, tiny_backbone_config, tiny_clip_dir):
    from vpd_ray.model.backbone import VPDBackbone
    from vpd_ray.modeling import VPDModel

    cls = get_task(request.param)
    task = cls(cls.config_class(**tiny_task_options(request.param, tiny_clip_dir)))
    torch.manual_seed(0)
    return task, VPDModel(VPDBackbone.from_config(tiny_backbone_config), {task.name: task})


def test_task_trains_every_parameter(task_and_model):
    task, model = task_and_model
    samples = synthetic_samples(task.name, 2, task.fields)
    rng = np.random.default_rng(0)
    batch = task.augment_on_device(torch.utils.data.default_collate([task.train_transform(s, rng) for s in samples]))
    assert batch["image"].dtype == torch.float32  # what the backbone takes, as the training step hands it over
    model.train()
    loss = task.loss(model(task.name, batch), batch)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{task.name}: no gradient for {missing[:5]} ({len(missing)} params)"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{task.name}: non-finite gradient in {bad[:5]}"
    assert not any(p.requires_grad for p in model.backbone.vae.parameters())


def test_task_predicts_and_scores(task_and_model):
    task, model = task_and_model
    samples = synthetic_samples(task.name, 2, task.fields)
    batch = torch.utils.data.default_collate([task.eval_transform(s) for s in samples])
    model.eval()
    pred = model.predict(task.name, batch)
    assert torch.isfinite(pred.float()).all()
    metric = task.metric()
    metric.update(pred, batch)
    values = metric.compute()
    assert task.primary_metric in values and math.isfinite(values[task.primary_metric])
    assert metric.state().dtype == torch.float64 and metric.state().dim() == 1


@pytest.fixture(scope="module")
def sd_v1_backbone_on_meta():
    """VPDBackbone at SD v1-5 shapes (UNet 320/640/1280/1280, 768-d context) without allocating 860M weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vpd_ray.model.backbone import SD_V1_DOWN_BLOCKS, SD_V1_UP_BLOCKS, VPDBackbone

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=SD_V1_DOWN_BLOCKS, up_block_types=SD_V1_UP_BLOCKS,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        )  # fmt: skip
        return VPDBackbone(unet, vae)


@pytest.mark.parametrize("tokens", [150, 40, 77])
def test_sd_v1_channel_bookkeeping(sd_v1_backbone_on_meta, tokens):
    from vpd_ray.model.heads.refer import ReferDecoder
    from vpd_ray.model.heads.seg import SemanticFPNHead

    info = sd_v1_backbone_on_meta.feature_info(tokens)
    assert [i["num_chs"] for i in info] == [320, 640 + tokens, 1280 + tokens, 1280]
    assert [i["reduction"] for i in info] == [8, 16, 32, 64]
    with torch.device("meta"):
        seg = SemanticFPNHead(info, num_classes=150)
        refer = ReferDecoder(info)
    assert [c.in_channels for c in seg.neck.lateral_convs] == [320, 640 + tokens, 1280 + tokens, 1280]
    assert refer.fuse4[0].in_channels == 1280 + 1280 + tokens and refer.fuse4[0].out_channels == 640


def test_task_context_lengths_match_the_paper():
    from vpd_ray.tasks.seg import SegConfig

    assert get_task("seg")(SegConfig()).context_tokens() == 150
    assert get_task("refer").config_class(text_encoder="tiny").max_tokens == 40
