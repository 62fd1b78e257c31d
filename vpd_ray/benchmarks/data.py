"""``python -m vpd_ray.bench data``: the NYU and ADE20K train input pipelines, samples/s per core.

Three loaders per dataset, timed in the same process on the same synthetic files, alternating for
``--rounds`` rounds (the median is shown, so load from other processes hits all alike):

- ``cpu-side``: what a loader core does in training: ``build_stream`` over the dataset's shards with
  the task's own ``train_transform`` (decode, CutDepth / resize, flip, crop, pad) and collation; the
  photometric augmentation is left for the device.
- ``cpu-side + device ops on CPU``: the same batches passed through ``task.augment_on_device`` in
  this process, i.e. what a CPU-only run costs per sample.
- ``cpu-side, JPEG decode left for the device`` (``data.jpeg_decode: device``): the loader reads each
  JPEG's header only and the batch carries the bytes; ``... + decode and device ops on CPU`` adds
  ``task.augment_on_device``, which then decodes (simplejpeg, in this process: a CPU run's device),
  places and augments. On a GPU the decode is nvJPEG's, which this machine cannot measure.
- ``reference-style``: loose files through a shuffled map-style DataLoader, OpenCV decode, and the
  reference's whole augmentation on the CPU the way its libraries do it (albumentations' LUT and
  ``cv2.cvtColor`` HSV for NYU as in GLPDepth/VPD; mmseg's Resize, RandomCrop, RandomFlip,
  PhotoMetricDistortion, Normalize, Pad for ADE20K), then ``ToTensor`` and collation.

Everything runs with one thread (torch and OpenCV) in the measuring process (``--workers 0``), so
samples/s is per core. Also printed: the ratio to the reference-style loader, the cores per GPU that
100 images/s need, and the time to the first batch of a training epoch (the shuffle buffer filling)
and of a validation pass.

Synthetic data: NYU pairs in the ``sync`` layout (480x640, smooth colour fields with noise: about
87 KB JPEGs at quality 95 and 340 KB uint16 depth PNGs, like NYU's) and ADE20K pairs in the
``ADEChallengeData2016`` layout (512x683, ADE's typical size, with 8-bit label PNGs of blobs of 150
classes), converted with the real shard writers. Needs OpenCV for the reference-style loader
(``pip install opencv-python-headless``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from vpd_ray.data.augment.depth import cut_depth, random_crop as depth_crop
from vpd_ray.data.augment.seg import random_crop as seg_crop, reduce_zero_label, rescale_size
from vpd_ray.data.pipeline import build_stream

NYU_HW = (480, 640)
ADE_HW = (512, 683)
TARGET_RATE = 100.0  # images/s one GPU takes: the "cores per GPU" column
SHUFFLE_BUFFER = {"nyu": 2000, "ade20k": 1000}  # configs/nyu.yaml, configs/ade20k.yaml
JPEG_LEFT = "cpu-side, JPEG decode left for the device"  # data.jpeg_decode: device
JPEG_LEFT_DONE = "... + decode and device ops on CPU"


# --- synthetic datasets ---------------------------------------------------------------------------

def _smooth_field(rng: np.random.Generator, hw: tuple[int, int], channels: int) -> np.ndarray:
    """Low-frequency random field in [0, 1], ``[H, W, C]``."""
    coarse = torch.from_numpy(rng.random((1, channels, hw[0] // 40, hw[1] // 40), dtype=np.float32))
    field = torch.nn.functional.interpolate(coarse, size=hw, mode="bicubic", align_corners=False)
    return field[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _photo(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    return np.clip(_smooth_field(rng, hw, 3) * 200 + rng.normal(0, 3, hw + (3,)), 0, 255).astype(np.uint8)


def _save_jpeg(path: str, image: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _save_png(path: str, array: np.ndarray) -> None:
    from vpd_ray.data.writer import encode_png

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode_png(array))


def make_nyu_tree(root: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` NYU-like pairs under ``root/sync/<scene>_0001/`` and their ``train_list.txt``; the path pairs."""
    rng = np.random.default_rng(seed)
    lines, pairs = [], []
    scenes = ("kitchen_0001", "bedroom_0001", "office_0001")
    for i in range(count):
        scene = scenes[i % len(scenes)]
        rgb, depth = f"/{scene}/rgb_{i:05d}.jpg", f"/{scene}/sync_depth_{i:05d}.png"
        pairs.append((os.path.join(root, "sync") + rgb, os.path.join(root, "sync") + depth))
        _save_jpeg(pairs[-1][0], _photo(rng, NYU_HW))
        _save_png(pairs[-1][1], (500 + _smooth_field(rng, NYU_HW, 1)[..., 0] * 9000).astype(np.uint16))
        lines.append(f"{rgb} {depth}")
    with open(os.path.join(root, "train_list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return pairs


def make_ade20k_tree(root: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` ADE-like training pairs (and an eighth as many validation ones) in the ``ADEChallengeData2016``
    layout; the training path pairs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for split, prefix, n in (("training", "train", count), ("validation", "val", max(count // 8, 1))):
        for i in range(n):
            stem = f"ADE_{prefix}_{i:08d}"
            image = os.path.join(root, "images", split, stem + ".jpg")
            label = os.path.join(root, "annotations", split, stem + ".png")
            _save_jpeg(image, _photo(rng, ADE_HW))
            blobs = rng.integers(0, 151, (ADE_HW[0] // 32 + 1, ADE_HW[1] // 32 + 1), dtype=np.uint8)
            _save_png(label, np.kron(blobs, np.ones((32, 32), np.uint8))[: ADE_HW[0], : ADE_HW[1]])
            if split == "training":
                pairs.append((image, label))
    return pairs


# --- the reference-style loaders (OpenCV, as the reference code's libraries do it) ------------------

def _one_thread_cv2() -> None:
    """OpenCV for the reference-style loader, on one thread like everything else here."""
    try:
        import cv2
    except ImportError:
        raise SystemExit("the reference-style loader needs OpenCV: pip install opencv-python-headless") from None
    cv2.setNumThreads(1)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.LUT(image, np.clip(table, 0, 255).astype(np.uint8))


def reference_nyu(paths: tuple[str, str], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """GLPDepth/VPD's NYU ``__getitem__``: ``cv2.imread`` image and depth, CutDepth, then albumentations'
    HorizontalFlip, RandomCrop, RandomBrightnessContrast, RandomGamma, HueSaturationValue, ToTensor."""
    import cv2

    image = cv2.cvtColor(cv2.imread(paths[0]), cv2.COLOR_BGR2RGB)
    depth = cv2.imread(paths[1], cv2.IMREAD_UNCHANGED).astype(np.float32) / 1000.0
    if rng.random() < 0.25:
        image = cut_depth(image, depth, rng)
    if rng.random() < 0.5:
        image, depth = cv2.flip(image, 1), cv2.flip(depth, 1)
    image, depth = depth_crop(image, depth, (480, 480), rng)
    ramp = np.arange(256, dtype=np.float32)
    if rng.random() < 0.5:
        image = _lut(image, ramp * (1 + rng.uniform(-0.2, 0.2)) + rng.uniform(-0.2, 0.2) * 255)
    if rng.random() < 0.5:
        image = _lut(image, (ramp / 255) ** rng.uniform(0.8, 1.2) * 255)
    if rng.random() < 0.5:
        dh, ds, dv = rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20)
        h, s, v = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
        hsv = cv2.merge((_lut(h, np.mod(ramp + dh, 180)), _lut(s, ramp + ds), _lut(v, ramp + dv)))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return {"image": torch.from_numpy(image).permute(2, 0, 1).float().div(255),
            "depth": torch.from_numpy(np.ascontiguousarray(depth))[None]}


def _mmseg_convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def reference_ade20k(paths: tuple[str, str], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """mmseg's ADE20K train pipeline as VPD configures it: LoadImageFromFile (cv2), LoadAnnotations (Pillow,
    reduce_zero_label), Resize (2048, 512) x 0.5..2 (cv2), RandomCrop 512 (cat_max_ratio 0.75), RandomFlip,
    PhotoMetricDistortion (cv2 HSV), Normalize (mean = std = 127.5, to RGB), Pad 512, DefaultFormatBundle."""
    import cv2
    from PIL import Image

    with open(paths[0], "rb") as f:
        image = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    label = reduce_zero_label(np.asarray(Image.open(paths[1])))
    ratio = rng.uniform(0.5, 2.0)
    h, w = rescale_size(image.shape[:2], (int(2048 * ratio), int(512 * ratio)))
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    image, label = seg_crop(image, label, rng, (512, 512))
    if rng.random() < 0.5:
        image, label = np.flip(image, 1), np.flip(label, 1)
    if rng.integers(2):
        image = _mmseg_convert(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = _mmseg_convert(image, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = _mmseg_convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and rng.integers(2):
        image = _mmseg_convert(image, alpha=rng.uniform(0.5, 1.5))
    image = (cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) - 127.5) / 127.5
    padded = np.zeros((512, 512, 3), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    padded_label = np.full((512, 512), 255, np.uint8)
    padded_label[: label.shape[0], : label.shape[1]] = label
    return {"image": torch.from_numpy(padded.transpose(2, 0, 1).copy()),
            "label": torch.from_numpy(padded_label).long()}


class LooseFiles(torch.utils.data.Dataset):
    """The reference's dataset: one sample = its files opened and decoded by ``read``, by list index."""

    def __init__(self, pairs: list[tuple[str, str]], read: Callable[[tuple[str, str], np.random.Generator], dict],
                 seed: int):
        self.pairs, self.read, self.rng = pairs, read, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return self.read(self.pairs[index], self.rng)


# --- timing ---------------------------------------------------------------------------------------

def _cycle(loader) -> Iterator[Any]:
    while True:
        yield from loader


def _rate(batches: Iterator[dict], count: int, finish: Callable[[dict], Any] | None = None) -> float:
    """Samples/s over ``count`` batches of an endless iterator (``finish``: work done on each batch)."""
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        batch = next(batches)
        if finish is not None:
            finish(batch)
        samples += len(batch["image"])
    return samples / (time.perf_counter() - start)


def _boundary_ratio(batches: Iterator[dict], per_epoch: int, epochs: int = 3) -> float:
    """The slowest first batch of a later epoch over the median other batch, in one stream of ``epochs``
    epochs: what an epoch boundary costs (the issue's target: at most 2x)."""
    times = []
    for _ in range(epochs * per_epoch):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    firsts = [times[k * per_epoch] for k in range(1, epochs)]
    steady = [t for i, t in enumerate(times) if i % per_epoch]
    return max(firsts) / statistics.median(steady)


def _first_batch_s(make: Callable[[], Any]) -> float:
    start = time.perf_counter()
    next(iter(make()))
    return time.perf_counter() - start


def _shards(items, out: str, prefix: str, shard_size: int) -> list[str]:
    from vpd_ray.data.writer import write_shards

    manifest = write_shards(items, out, prefix, max_count=shard_size)
    return [os.path.join(out, s["name"]) for s in manifest["shards"]]


def prepare(root: str, name: str, samples: int, shard_size: int) -> dict[str, Any]:
    """The dataset's files, shards, task and reference reader."""
    from vpd_ray.data.ade20k import ade20k_items
    from vpd_ray.data.nyu import nyu_items
    from vpd_ray.tasks.depth import DepthConfig, DepthTask
    from vpd_ray.tasks.seg import SegConfig, SegTask

    if name == "nyu":
        pairs = make_nyu_tree(root, samples)
        items = nyu_items(root, "train", os.path.join(root, "train_list.txt"))
        train = _shards(items, os.path.join(root, "shards"), "nyu-train", shard_size)
        return {"task": DepthTask(DepthConfig()), "pairs": pairs, "reference": reference_nyu, "train": train,
                "val": train}  # the eval transform is the same whatever the split
    tree = os.path.join(root, "ADEChallengeData2016")
    pairs = make_ade20k_tree(tree, samples)
    return {"task": SegTask(SegConfig()), "pairs": pairs, "reference": reference_ade20k,
            "train": _shards(ade20k_items(tree, "train", shuffle_seed=0), os.path.join(root, "shards"), "ade-train",
                             shard_size),
            "val": _shards(ade20k_items(tree, "val"), os.path.join(root, "shards"), "ade-val", shard_size)}


def measure(data: dict[str, Any], name: str, batch_size: int, batches: int, rounds: int) -> dict[str, float]:
    """Median samples/s of the three loaders, the first-batch times (seconds) and the epoch-boundary ratio."""
    task = data["task"]

    def train_stream(jpeg_decode: str = "loader"):
        return build_stream(data["train"], task.train_transform, train=True, batch_size=batch_size, fields=task.fields,
                            num_workers=0, shuffle_buffer=SHUFFLE_BUFFER[name], rank=0, world_size=1,
                            jpeg_decode=jpeg_decode)

    first = {"first batch, train epoch (s)": _first_batch_s(train_stream),
             "first batch, validation pass (s)": _first_batch_s(
                 lambda: build_stream(data["val"], task.eval_transform, train=False, batch_size=1, fields=task.fields,
                                      num_workers=0, rank=0, world_size=1)),
             "epoch-boundary batch / steady batch": _boundary_ratio(iter(train_stream()),
                                                                    len(data["pairs"]) // batch_size)}
    ours, deferred = iter(train_stream()), iter(train_stream("device"))
    reference = _cycle(torch.utils.data.DataLoader(LooseFiles(data["pairs"], data["reference"], 0),
                                                   batch_size=batch_size, shuffle=True, drop_last=True))
    loaders = {"cpu-side": (ours, None), "cpu-side + device ops on CPU": (ours, task.augment_on_device),
               JPEG_LEFT: (deferred, None), JPEG_LEFT_DONE: (deferred, task.augment_on_device),
               "reference-style": (reference, None)}
    for batches_it, finish in loaders.values():  # warm-up: first-call costs and the shuffle buffer
        _rate(batches_it, 1, finish)
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(rounds):
        for label, (batches_it, finish) in loaders.items():
            rates[label].append(_rate(batches_it, batches, finish))
    return {**{k: statistics.median(v) for k, v in rates.items()}, **first}


def report(name: str, result: dict[str, float], batch_size: int, batches: int, rounds: int) -> str:
    reference = result["reference-style"]
    lines = [f"\n{name} train pipeline, {batches} batches of {batch_size} per round, median of {rounds} rounds, "
             f"1 core", "| loader | samples/s/core | vs reference-style | cores per GPU at 100 images/s |",
             "|---|---|---|---|"]
    for label in ("cpu-side", "cpu-side + device ops on CPU", JPEG_LEFT, JPEG_LEFT_DONE, "reference-style"):
        rate = result[label]
        lines.append(f"| {label} | {rate:.1f} | {rate / reference:.2f}x | {TARGET_RATE / rate:.2f} |")
    lines += [f"{k}: {result[k]:.2f}" for k in ("first batch, train epoch (s)", "first batch, validation pass (s)",
                                                 "epoch-boundary batch / steady batch")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96, help="synthetic training pairs per dataset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds; the median is shown")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    parser.add_argument("--datasets", nargs="+", default=["nyu", "ade20k"], choices=["nyu", "ade20k"])
    parser.add_argument("--root", help="working folder (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _one_thread_cv2()
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = prepare(os.path.join(args.root or tmp, name), name, args.samples, args.shard_size)
            result = measure(data, name, args.batch_size, args.batches, args.rounds)
            print(report(name, result, args.batch_size, args.batches, args.rounds), flush=True)
            summary.append(f"{name} cpu-side: {result['cpu-side']:.0f} samples/s/core, "
                           f"{result['cpu-side'] / result['reference-style']:.1f} x reference")
    print("\n" + "\n".join(summary))
    return 0
