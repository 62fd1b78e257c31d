"""Drawing primitives: colours on stated scales, the ADE20K palette, overlays, legends, figures."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from vpd_ray import visualize as vz
from vpd_ray.model.text import ADE20K_CLASSES


def _rgb(cmap: str, x: float) -> tuple[int, ...]:
    return tuple(int(c) for c in (np.array(colormaps[cmap](x)[:3]) * 255).round())


def _photo(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_ade20k_palette_is_mmsegs():
    palette = vz.ADE20K_PALETTE
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    # mmseg/datasets/ade.py, ADE20KDataset: wall, building, sky, floor, tree, ... flag
    assert palette[:5].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3]]
    assert palette[-1].tolist() == [92, 0, 255]
    # 150 entries, 149 distinct: the published table gives road (6) and skyscraper (48) one colour
    colours = [tuple(c) for c in palette.tolist()]
    assert len(set(colours)) == 149
    assert [i for i, c in enumerate(colours) if colours.count(c) > 1] == [6, 48]
    assert len(ADE20K_CLASSES) == len(palette)
    assert vz.IGNORE_RGB not in colours


def test_depth_scale_maps_min_and_max_to_the_colormap_ends():
    depth = np.array([[0.0, 1.5, 2.0], [4.0, 7.5, 3.0]], dtype=np.float32)
    panel = vz.depth_panel(depth)
    assert (panel.scale.vmin, panel.scale.vmax) == (1.5, 7.5)  # the valid pixels' range
    assert "(m)" in panel.scale.label
    assert tuple(panel.pixels[0, 1]) == _rgb(vz.DEPTH_CMAP, 0.0)
    assert tuple(panel.pixels[1, 1]) == _rgb(vz.DEPTH_CMAP, 1.0)
    assert tuple(panel.pixels[0, 0]) == vz.NO_DATA_RGB  # depth 0: no measurement
    assert [name for name, _ in panel.legend] == ["no depth (0 m)"]

    fixed = vz.depth_panel(depth, vmin=0.0, vmax=10.0)
    assert tuple(fixed.pixels[1, 1]) == _rgb(vz.DEPTH_CMAP, 0.75)
    flat = vz.depth_panel(np.full((2, 2), 5.0))  # a constant map still has two colour-bar ends
    assert flat.scale.vmin < 5.0 < flat.scale.vmax and not flat.legend


def test_no_data_grey_is_on_neither_colormap():
    for cmap in (vz.DEPTH_CMAP, vz.ERROR_CMAP):
        lut = colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255
        assert np.sqrt(((lut - np.array(vz.NO_DATA_RGB)) ** 2).sum(1)).min() > 60


def test_error_map_is_absolute_metres_on_its_own_scale():
    gt = np.array([[2.0, 3.0], [0.0, 4.0]], dtype=np.float32)
    pred = np.array([[2.5, 3.0], [9.0, 2.0]], dtype=np.float32)
    panel = vz.error_panel(pred, gt)
    assert (panel.scale.vmin, panel.scale.vmax) == (0.0, 2.0) and panel.scale.label == "absolute error (m)"
    assert tuple(panel.pixels[0, 1]) == _rgb(vz.ERROR_CMAP, 0.0)
    assert tuple(panel.pixels[1, 1]) == _rgb(vz.ERROR_CMAP, 1.0)
    assert tuple(panel.pixels[1, 0]) == vz.NO_DATA_RGB  # no ground truth there
    with pytest.raises(ValueError, match="differ in size"):
        vz.error_panel(pred, gt[:1])


def test_overlays_with_alpha_0_are_the_image_and_alpha_1_the_colours():
    image = _photo()
    label = np.zeros((48, 64), dtype=np.uint8)
    label[:, 32:] = 2
    label[:4] = vz.IGNORE_INDEX
    np.testing.assert_array_equal(vz.seg_overlay(image, label, alpha=0.0), image)
    full = vz.seg_overlay(image, label, alpha=1.0)
    assert tuple(full[10, 40]) == tuple(vz.ADE20K_PALETTE[2]) and tuple(full[0, 0]) == vz.IGNORE_RGB
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    np.testing.assert_array_equal(vz.refer_overlay(image, mask, alpha=0.0), image)
    tinted = vz.refer_overlay(image, mask, alpha=1.0)
    assert tuple(tinted[15, 15]) == vz.REFER_RGB
    np.testing.assert_array_equal(tinted[30:], image[30:])  # outside the mask: untouched
    with pytest.raises(ValueError, match="differ in size"):
        vz.seg_overlay(image, label[:10])


def test_legend_lists_only_the_classes_present_largest_first():
    label = np.full((10, 10), 3, dtype=np.uint8)  # floor
    label[:, :3] = 0  # wall
    label[0, :] = vz.IGNORE_INDEX
    legend = vz.class_legend(label, ADE20K_CLASSES)
    assert [name for name, _ in legend] == ["floor 63%", "wall 27%", "ignored (255) 10%"]
    assert [rgb for _, rgb in legend] == [tuple(vz.ADE20K_PALETTE[3]), tuple(vz.ADE20K_PALETTE[0]), vz.IGNORE_RGB]
    many = vz.class_legend(np.arange(40, 140, dtype=np.uint8).reshape(10, 10), ADE20K_CLASSES[:41], limit=3)
    assert [name for name, _ in many] == ["base 1%", "class 41 1%", "class 42 1%", "97 more classes"]


def test_render_puts_titled_panels_side_by_side(tmp_path):
    image = _photo()
    depth = np.linspace(0.5, 8.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    panels = [vz.image_panel(image), vz.depth_panel(depth, "ground truth"), vz.depth_panel(depth * 1.1, "prediction"),
              vz.error_panel(depth * 1.1, depth)]
    one, four = vz.render(panels[:1]), vz.render(panels)
    assert one.dtype == four.dtype == np.uint8 and one.ndim == four.ndim == 3 and four.shape[2] == 3
    assert four.shape[1] > 3 * one.shape[1]
    assert four.std() > 10  # drawn, not blank
    seg = vz.render([vz.seg_panel(image, np.zeros((48, 64), np.uint8), ADE20K_CLASSES),
                     vz.refer_panel(image, np.ones((48, 64), np.uint8), "the one on the left")])
    assert seg.shape[2] == 3
    with pytest.raises(ValueError, match="at least one panel"):
        vz.render([])


def _eval_batch(h=32, w=40, b=2):
    import torch

    gen = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 3, h, w, generator=gen)}, gen


def test_each_task_draws_its_own_example_from_an_eval_batch():
    """What TensorBoard gets at validation: the task turns (batch, predict output, index) into panels."""
    import torch

    from vpd_ray.tasks.depth import DepthConfig, DepthTask
    from vpd_ray.tasks.refer import ReferConfig, ReferTask
    from vpd_ray.tasks.seg import SegConfig, SegTask

    batch, gen = _eval_batch()
    depth = DepthTask(DepthConfig())
    truth = torch.rand(2, 1, 32, 40, generator=gen) * 5
    truth[:, :, :4] = 0  # no measurement
    panels = depth.example({**batch, "depth": truth}, truth * 1.1, 1)
    assert [p.title for p in panels] == ["image", "ground truth", "prediction", "|prediction − ground truth|"]
    assert panels[1].scale == panels[2].scale  # one scale per sample for truth and prediction
    assert panels[0].pixels.dtype == np.uint8 and panels[0].pixels.shape == (32, 40, 3)
    np.testing.assert_array_equal(panels[0].pixels, (batch["image"][1].permute(1, 2, 0) * 255).round().byte().numpy())

    seg = SegTask(SegConfig(num_classes=150))
    label = torch.randint(0, 150, (2, 32, 40), generator=gen)
    panels = seg.example({**batch, "label": label}, label, 0)
    assert [p.title for p in panels] == ["image", "ground truth", "prediction"] and panels[2].legend

    refer = ReferTask(ReferConfig(text_encoder="tiny", max_tokens=8))
    ids = torch.zeros(2, 2, 8, dtype=torch.long)
    ids[:, 0] = refer.tokenize(["the red cup", "a dog"])
    mask = (torch.rand(2, 32, 40, generator=gen) > 0.5).long()
    panels = refer.example({**batch, "mask": mask, "input_ids": ids}, mask[:, None].expand(2, 2, 32, 40), 0)
    assert [p.title for p in panels] == ["image", "ground truth", "prediction"]
    assert "red cup" in panels[0].caption
    for task in (depth, seg, refer):
        assert vz.render(task.panels(_photo(), np.ones((48, 64), np.uint8), sentence="x")).std() > 10


def test_depth_fixed_scale_is_the_models_range():
    from vpd_ray.tasks.depth import DepthConfig, DepthTask

    panels = DepthTask(DepthConfig(max_depth=10.0)).panels(_photo(), np.full((48, 64), 2.0), fixed_scale=True)
    assert [p.title for p in panels] == ["image", "prediction"]
    assert (panels[1].scale.vmin, panels[1].scale.vmax) == (0.0, 10.0)
