"""The depth task: head shapes, SiLog loss, metrics, the NYUv2 sliding-window protocol, class context."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vpd_ray.metrics import DEPTH_METRICS, DepthMetric, depth_metrics
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.modeling import VPDModel
from vpd_ray.tasks import get_task, list_tasks
from vpd_ray.tasks.depth import DepthConfig, DepthTask, silog_loss, sliding_window_predict, window_offsets


@pytest.fixture(scope="module")
def model(tiny_backbone_config):
    task = DepthTask(DepthConfig(head_dim=16))
    return VPDModel(VPDBackbone.from_config(tiny_backbone_config), {"depth": task}).eval()


def test_registered():
    assert "depth" in list_tasks() and get_task("depth") is DepthTask


@pytest.mark.parametrize("side", [480, 512])
def test_depth_map_at_input_resolution(model, side):
    batch = {"image": torch.rand(1, 3, side, side), "class_id": torch.tensor([4])}
    with torch.no_grad():
        depth = model("depth", batch)
    assert depth.shape == (1, 1, side, side)
    assert 0 < depth.min() and depth.max() < 10.0


def test_context_is_scene_embedding_token(model):
    table = model.backbone.class_embeddings["nyu"]
    assert table.weight.shape == (28, model.backbone.text_dim)  # 27 scenes + the mean row
    ctx = model.tasks["depth"].context(model.backbone, {"class_id": torch.tensor([2, -1])})
    assert ctx.shape == (2, 1, model.backbone.text_dim)
    torch.testing.assert_close(ctx[1, 0], table.weight[:27].mean(0))


def test_training_step_gives_every_trainable_parameter_a_gradient(tiny_backbone_config):
    task = DepthTask(DepthConfig(head_dim=16))
    model = VPDModel(VPDBackbone.from_config(tiny_backbone_config), {"depth": task})
    batch = {"image": torch.rand(2, 3, 128, 128), "depth": torch.rand(2, 1, 128, 128) * 5}
    batch["class_id"] = torch.tensor([0, -1])
    loss = task.loss(model("depth", batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every UNet, adapter and head parameter feeds the loss
    assert all(p.grad is None for p in model.backbone.vae.parameters())


def test_silog_loss_hand_computed():
    pred = torch.tensor([1.0, 2.0, 4.0, 3.0])
    gt = torch.tensor([2.0, 2.0, 1.0, 0.0])  # the last pixel has no ground truth
    d = [math.log(2.0), 0.0, math.log(0.25)]
    mean_sq, mean = sum(x * x for x in d) / 3, sum(d) / 3
    expected = math.sqrt(mean_sq - 0.5 * mean * mean)
    assert silog_loss(pred, gt).item() == pytest.approx(expected, rel=1e-6)
    assert torch.isnan(silog_loss(pred, torch.zeros(4)))  # no valid depth: the finite-loss check's case
    boolean = torch.log(gt[gt > 0]) - torch.log(pred[gt > 0])  # the boolean-indexing form it replaces
    manual = torch.sqrt((boolean**2).mean() - 0.5 * boolean.mean() ** 2)
    torch.testing.assert_close(silog_loss(pred, gt), manual)
    leaf = pred.clone().requires_grad_()
    silog_loss(leaf, gt).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[3] == 0  # no gradient where gt is missing


def test_class_ids_are_checked_in_the_transform():
    task = DepthTask(DepthConfig())
    assert task._class_id({"meta": {"class_id": 26}}).item() == 26
    with pytest.raises(ValueError, match=r"sample 'k': class_id 27 outside -1..26"):
        task._class_id({"__key__": "k", "meta": {"class_id": 27}})


def test_depth_metrics_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    gt = torch.tensor([[1.0, 4.0], [2.0, 0.0]])  # gt 0 is invalid
    m = depth_metrics(pred, gt, eigen_crop=False)
    p, g = np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 2.0])
    dl = np.log(p) - np.log(g)
    expected = {
        "d1": 1 / 3, "d2": 2 / 3, "d3": 2 / 3,  # ratios 1, 2, 1.5 against 1.25, 1.5625, 1.953
        "abs_rel": np.mean(np.abs(p - g) / g), "sq_rel": np.mean((p - g) ** 2 / g),
        "rmse": np.sqrt(np.mean((p - g) ** 2)), "rmse_log": np.sqrt(np.mean(dl**2)),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))), "silog": np.sqrt(np.mean(dl**2) - 0.5 * np.mean(dl) ** 2),
    }  # fmt: skip
    assert set(m) == set(DEPTH_METRICS)
    for k in DEPTH_METRICS:
        assert m[k] == pytest.approx(expected[k], rel=1e-9), k


def test_depth_metrics_eigen_crop_and_non_finite_predictions():
    gt = torch.full((480, 640), 2.0)
    pred = torch.full((480, 640), 2.0)
    pred[0, 0] = 100.0  # outside the crop: ignored
    pred[45, 41] = float("inf")  # inside: counts as max_depth (10)
    pred[470, 600] = float("nan")  # inside: counts as min_depth (1e-3)
    m = depth_metrics(pred, gt)
    n = (471 - 45) * (601 - 41)
    assert m["rmse"] == pytest.approx(math.sqrt((8.0**2 + (2 - 1e-3) ** 2) / n), rel=1e-9)
    assert m["d1"] == pytest.approx((n - 2) / n)
    with pytest.raises(ValueError, match="Eigen crop is defined on 480x640 images, got \\[48, 64\\]"):
        depth_metrics(torch.ones(48, 64), torch.ones(48, 64))


def test_depth_metric_states_add_up():
    gen = torch.Generator().manual_seed(0)
    preds = torch.rand(3, 1, 480, 640, generator=gen) * 9 + 0.5
    gts = torch.rand(3, 1, 480, 640, generator=gen) * 9 + 0.5
    whole, first, second = DepthMetric(), DepthMetric(), DepthMetric()
    whole.update(preds, {"depth": gts})
    first.update(preds[:1], {"depth": gts[:1]})
    second.update(preds[1:], {"depth": gts[1:]})
    merged = DepthMetric()
    merged.load_state(first.state() + second.state())
    per_image = [depth_metrics(p, g) for p, g in zip(preds, gts)]
    for k, v in merged.compute().items():
        assert v == pytest.approx(whole.compute()[k], rel=1e-12)
        assert v == pytest.approx(np.mean([m[k] for m in per_image]), rel=1e-12)


def test_window_offsets():
    assert window_offsets(640, 480) == [0, 160]
    assert window_offsets(480, 480) == [0]
    assert window_offsets(1000, 480) == [0, 260, 520]
    with pytest.raises(ValueError, match="3 windows of width 480 cannot tile width 1001"):
        window_offsets(1001, 480)
    with pytest.raises(ValueError, match="window width 480 exceeds image width 400"):
        window_offsets(400, 480)


def test_protocol_matches_direct_computation_on_480x640(model):
    image = torch.rand(1, 3, 480, 640, generator=torch.Generator().manual_seed(3))
    batch = {"image": image, "class_id": torch.tensor([5])}
    pred = model.predict("depth", batch)
    with torch.no_grad():
        def run(x):
            return model("depth", {"image": x, "class_id": torch.tensor([5])})

        left, right = (image[..., x : x + 480] for x in (0, 160))
        left = (run(left) + run(left.flip(-1)).flip(-1)) / 2
        right = (run(right) + run(right.flip(-1)).flip(-1)) / 2
    expected = torch.zeros(1, 1, 480, 640)
    expected[..., :160] = left[..., :160]
    expected[..., 160:480] = (left[..., 160:] + right[..., :320]) / 2
    expected[..., 480:] = right[..., 320:]
    assert pred.shape == (1, 1, 480, 640)
    torch.testing.assert_close(pred, expected, rtol=1e-4, atol=1e-5)


def test_protocol_repeats_per_sample_inputs_and_rejects_wrong_height():
    seen = {}

    def forward(images, batch):  # depth = the image's red channel, so the windows must average back to it
        seen["class_id"] = batch["class_id"]
        return images[:, :1]

    images = torch.rand(2, 3, 4, 6)
    out = sliding_window_predict(forward, {"image": images, "class_id": torch.tensor([1, 2])}, (4, 4), flip=True)
    torch.testing.assert_close(out, images[:, :1])
    assert seen["class_id"].tolist() == [1, 2] * 4  # 2 windows x (plain, flipped)
    with pytest.raises(ValueError, match="image height 5 differs from the test window height 4"):
        sliding_window_predict(forward, {"image": torch.rand(1, 3, 5, 6)}, (4, 4), flip=False)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"crop_size must be \[height, width\] > 0, got \[480\]"):
        DepthConfig(crop_size=[480])
    with pytest.raises(ValueError, match="0 < min_depth < max_depth, got 1.0, 0.5"):
        DepthConfig(min_depth=1.0, max_depth=0.5)


def test_class_id_from_metadata():
    task = DepthTask(DepthConfig())
    assert task._class_id({"meta": {"class_id": 3}}).item() == 3
    assert task._class_id({"meta": {"scene": "kitchen"}}).item() == 15
    assert task._class_id({"meta": {}}).item() == -1


def test_transforms_produce_batch_tensors():
    task = DepthTask(DepthConfig(crop_size=[64, 64]))
    sample = {"image": np.zeros((96, 128, 3), np.uint8), "depth": np.ones((96, 128), np.float32)}
    sample["meta"] = {"class_id": 1}
    out = task.train_transform(sample, np.random.default_rng(0))
    assert out["image"].shape == (3, 64, 64) and out["depth"].shape == (1, 64, 64) and out["class_id"].item() == 1
    out = task.eval_transform(sample)
    assert out["image"].shape == (3, 96, 128) and out["depth"].shape == (1, 96, 128)


def test_class_embeddings_file_shape_checked(tmp_path, tiny_backbone_config):
    from vpd_ray.model.text import save_class_embeddings

    path = tmp_path / "nyu.safetensors"
    save_class_embeddings(str(path), torch.randn(27, 7), [f"c{i}" for i in range(27)])
    task = DepthTask(DepthConfig(head_dim=16, class_embeddings=str(path)))
    with pytest.raises(ValueError, match=r"shape \[27, 7\], expected \[27, 32\]"):
        task.build_head(VPDBackbone.from_config(tiny_backbone_config))
