"""``data.jpeg_decode: device``: JPEGs decoded after the copy give the loader path's batches exactly.

On a CPU run the "device" is the training process, which decodes with the loader's own decoder, so a
batch made on the device must equal the loader's bit for bit: the same draws, crops, flips, CutDepth,
resizes and labels. The CUDA-only pieces (torchvision's nvJPEG call, the float resize) are checked
against what they stand for.
"""

from __future__ import annotations

import functools
import itertools
import sys
import types

import numpy as np
import pytest
import torch

from vpd_ray.config import ConfigError, compose, validate
from vpd_ray.data import device_decode
from vpd_ray.data.augment import seg as seg_aug
from vpd_ray.data.device_decode import DeferredImage, PendingImage
from vpd_ray.data.pipeline import build_stream
from vpd_ray.data.synth import render_depth, render_seg
from vpd_ray.data.writer import SourceItem, encode_png, write_shards
from vpd_ray.errors import DataError
from vpd_ray.tasks.depth import DepthConfig, DepthTask
from vpd_ray.tasks.seg import SegConfig, SegTask

DEPTH_TASK = DepthTask(DepthConfig(crop_size=[40, 48]))
SEG_TASK = SegTask(SegConfig(num_classes=6, scale=[128, 48], ratio_range=[0.5, 2.0], crop_size=[48, 48]))


def _as_png(render, seed: int, index: int, hw: tuple[int, int]) -> dict[str, bytes]:
    """A synthetic sample whose image is a PNG, which the loader decodes in either mode."""
    from vpd_ray.data.decode import decode_image

    fields = render(seed, index, hw)
    return {**{k: v for k, v in fields.items() if k != "jpg"}, "png": encode_png(decode_image(fields.pop("jpg")))}


def _shards(root, render, count: int, hw: tuple[int, int], png_every: int = 0) -> str:
    """Shards of ``count`` synthetic samples; every ``png_every``-th has a PNG image instead of a JPEG."""
    items = []
    for i in range(count):
        png = png_every and i % png_every == 0
        load = functools.partial(_as_png, render, 0, i, hw) if png else functools.partial(render, 0, i, hw)
        items.append(SourceItem(key=f"s{i:04d}", load=load, est_bytes=hw[0] * hw[1], source=f"synth/{i}"))
    write_shards(items, str(root), "t", max_count=8)
    return str(root)


def _batches(shards: str, task, jpeg_decode: str, count: int = 3) -> list[dict]:
    stream = build_stream(shards, task.train_transform, train=True, batch_size=4, seed=3, fields=task.fields,
                          num_workers=0, shuffle_buffer=8, rank=0, world_size=1, jpeg_decode=jpeg_decode)
    return list(itertools.islice(iter(stream), count))


def _assert_same_batches(loader: list[dict], device: list[dict], task) -> None:
    for ours, theirs in zip(loader, device):
        assert isinstance(theirs["image"], list) and all(isinstance(p, PendingImage) for p in theirs["image"])
        assert ours["__key__"] == theirs["__key__"]
        for key, value in ours.items():
            if torch.is_tensor(value) and key != "image":
                assert torch.equal(value, theirs[key]), key
        assert torch.equal(task.augment_on_device(ours)["image"], task.augment_on_device(theirs)["image"])


@pytest.mark.parametrize("task, render, hw", [(DEPTH_TASK, render_depth, (48, 64)), (SEG_TASK, render_seg, (40, 60))],
                         ids=["depth", "seg"])
def test_batches_decoded_on_the_device_are_the_loaders(tmp_path, task, render, hw):
    """Whole train batches, JPEGs and (every 5th sample) PNGs mixed: the images left encoded are decoded
    and placed after collation, to the loader's pixels; every other field is the loader's."""
    shards = _shards(tmp_path, render, 24, hw, png_every=5)
    loader, device = _batches(shards, task, "loader"), _batches(shards, task, "device")
    pending = [p for batch in device for p in batch["image"]]
    assert {p.image is None for p in pending} == {True, False}  # both kinds of sample were drawn
    _assert_same_batches(loader, device, task)


@pytest.mark.parametrize("name", ["depth", "seg"])
def test_training_steps_are_the_same_with_either_decode(name):
    """The product's training step (Stepper) on the sample shards, through a loader process (the pending
    images cross it pickled): the same losses, step for step, as with the loader decoding."""
    from learning_loop import build, train

    task = {"depth": lambda: DepthTask(DepthConfig(crop_size=[64, 64])),
            "seg": lambda: SegTask(SegConfig(num_classes=6, crop_size=[64, 64], scale=[256, 64]))}[name]
    losses = {mode: train(build({name: task()}), 3, 1e-3, jpeg_decode=mode) for mode in ("loader", "device")}
    assert losses["loader"] == losses["device"] and all(map(np.isfinite, losses["loader"]))


def test_eval_streams_decode_in_the_loader(tmp_path):
    shards = _shards(tmp_path, render_depth, 4, (48, 64))
    stream = build_stream(shards, DEPTH_TASK.eval_transform, train=False, batch_size=1, fields=DEPTH_TASK.fields,
                          num_workers=0, rank=0, world_size=1, jpeg_decode="device")
    assert all(torch.is_tensor(batch["image"]) for batch in stream)


def test_a_jpeg_that_does_not_decode_names_its_sample(tmp_path):
    """A body that fails on the device is a DataError (no retry) naming shard and key; the loader, which
    read only the header, let it through."""
    fields = render_depth(0, 0, (48, 64))
    jpeg = fields["jpg"][: len(fields["jpg"]) // 2]  # the header reads, the body ends early
    good = DeferredImage(48, 64, "shard a.tar, key good", jpeg=fields["jpg"])
    bad = DeferredImage(48, 64, "shard a.tar, key broken", jpeg=jpeg)
    with pytest.raises(DataError, match="shard a.tar, key broken: JPEG does not decode on cpu"):
        device_decode.decode_jpegs([good, bad], torch.device("cpu"))


def test_gpu_decode_hands_torchvision_the_bytes_in_one_call(monkeypatch):
    """The CUDA path's call, against a stand-in for torchvision.io (whose CUDA build this CPU machine
    cannot load): every JPEG of the batch in one call, as 1-d uint8 host tensors, decoded to RGB."""
    import simplejpeg

    calls = []

    def decode_jpeg(data, mode, device):
        calls.append((data, mode, device))
        return [torch.from_numpy(simplejpeg.decode_jpeg(bytes(d.numpy()), "RGB")).permute(2, 0, 1) for d in data]

    io = types.SimpleNamespace(decode_jpeg=decode_jpeg, ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", io)
    jpegs = [DeferredImage(48, 64, f"key {i}", jpeg=render_depth(0, i, (48, 64))["jpg"]) for i in range(3)]
    images = device_decode.decode_jpegs(jpegs, torch.device("cuda"))  # a CUDA device takes torchvision's path
    [(data, mode, device)] = calls
    assert mode == "RGB" and device == torch.device("cuda") and len(data) == 3
    assert all(d.dtype == torch.uint8 and d.ndim == 1 and bytes(d.numpy()) == j.jpeg for d, j in zip(data, jpegs))
    assert torch.equal(torch.stack(images), torch.stack(device_decode._host_decode(jpegs, torch.device("cpu"))))


def test_the_gpu_resize_is_within_one_level_of_the_loaders():
    """CUDA has no uint8 bilinear kernel: the device path resizes in float and rounds, up and down."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 37, 53), dtype=np.uint8))
    for hw in [(74, 106), (20, 29), (51, 40)]:
        exact = seg_aug.resize_tensor(image, hw)
        rounded = seg_aug.resize_rounded(image, hw)
        assert rounded.dtype == torch.uint8 and (rounded.int() - exact.int()).abs().max() <= 1


@pytest.mark.parametrize("config, overrides, words", [
    ("configs/sample.yaml", ["data.jpeg_decode=gpu"], "data.jpeg_decode: 'gpu' is not one of loader, device"),
    ("configs/sample_refer.yaml", ["data.jpeg_decode=device"], "not supported by task(s) refer"),
])
def test_bad_jpeg_decode_is_one_config_error(config, overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(config, overrides))


def test_gpu_workers_need_torchvision(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    cfg = compose("configs/sample.yaml", ["data.jpeg_decode=device", "scaling.use_gpu=true"])
    with pytest.raises(ConfigError, match="install torchvision built for the installed torch"):
        validate(cfg)
    validate(compose("configs/sample.yaml", ["data.jpeg_decode=device"]))  # a CPU run decodes in-process
