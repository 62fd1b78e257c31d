"""``python -m vpd_ray.bench data``: NYU train input pipeline, shards vs loose files, samples/s per core.

Both sides run the same work on the same images in the same process: decode the 480x640 JPEG and
the uint16 depth PNG, VPD's train augmentation with a 480x480 crop (or, for the "decode" rows,
tensor conversion only), and collation into batches. The loose-file side reads the reference way,
one ``open`` per file and a PIL decode (the reference uses cv2, which vpd_ray does not depend on),
through a shuffled map-style DataLoader; the shard side streams through ``build_stream``. With
``--workers 0`` everything runs on one core, so samples/s is per core.

The images are synthetic, in the NYU ``sync`` layout (smooth colour fields with noise: about
87 KB JPEGs at quality 95 and 340 KB depth PNGs, like NYU's), converted with the real NYU shard
writer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from vpd_ray.data.augment.depth import eval_prepare, train_augment
from vpd_ray.data.decode import decode_depth, decode_image
from vpd_ray.data.pipeline import build_stream

NYU_HW = (480, 640)
CROP = (480, 480)


def _smooth_field(rng: np.random.Generator, hw: tuple[int, int], channels: int) -> np.ndarray:
    """Low-frequency random field in [0, 1], ``[H, W, C]``."""
    coarse = torch.from_numpy(rng.random((1, channels, hw[0] // 40, hw[1] // 40), dtype=np.float32))
    field = torch.nn.functional.interpolate(coarse, size=hw, mode="bicubic", align_corners=False)
    return field[0].permute(1, 2, 0).clamp(0, 1).numpy()


def make_nyu_tree(root: str, count: int, seed: int = 0) -> str:
    """``count`` NYU-like pairs under ``root/sync/<scene>_0001/`` and their ``train_list.txt``."""
    from vpd_ray.data.writer import encode_png

    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = []
    scenes = ("kitchen_0001", "bedroom_0001", "office_0001")
    for i in range(count):
        scene = scenes[i % len(scenes)]
        folder = os.path.join(root, "sync", scene)
        os.makedirs(folder, exist_ok=True)
        image = _smooth_field(rng, NYU_HW, 3) * 200 + rng.normal(0, 3, NYU_HW + (3,))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"rgb_{i:05d}.jpg"),
                                                                     quality=95)
        depth = (500 + _smooth_field(rng, NYU_HW, 1)[..., 0] * 9000).astype(np.uint16)
        with open(os.path.join(folder, f"sync_depth_{i:05d}.png"), "wb") as f:
            f.write(encode_png(depth))
        lines.append(f"/{scene}/rgb_{i:05d}.jpg /{scene}/sync_depth_{i:05d}.png")
    with open(os.path.join(root, "train_list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(root, "train_list.txt")


def augment(sample: dict, rng: np.random.Generator) -> dict:
    image, depth = train_augment(sample["image"], sample["depth"], rng, CROP)
    return {"image": image, "depth": depth}


def prepare(sample: dict, rng: np.random.Generator) -> dict:
    image, depth = eval_prepare(sample["image"], sample["depth"])
    return {"image": image, "depth": depth}


class LooseFiles(torch.utils.data.Dataset):
    """The reference's dataset: one open + decode per image and per depth map, by list index."""

    def __init__(self, root: str, list_file: str, transform, seed: int):
        with open(list_file) as f:
            self.pairs = [line.split()[:2] for line in f if line.strip()]
        self.base, self.transform, self.rng = os.path.join(root, "sync"), transform, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        rgb, depth = (os.path.join(self.base, p.lstrip("/")) for p in self.pairs[index])
        with open(rgb, "rb") as f:
            image = decode_image(f.read())
        with open(depth, "rb") as f:
            depth_m = decode_depth(f.read())
        return self.transform({"image": image, "depth": depth_m}, self.rng)


def _rate(batches, count: int) -> float:
    """Samples/s over ``count`` batches of an iterator, after one warm-up batch."""
    it = batches
    next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        samples += len(next(it)["image"])
    return samples / (time.perf_counter() - start)


def run(root: str, samples: int, batch_size: int, batches: int, workers: int, shard_size: int,
        rounds: int) -> list[tuple]:
    from vpd_ray.data.nyu import nyu_items
    from vpd_ray.data.writer import write_shards

    list_file = make_nyu_tree(root, samples)
    manifest = write_shards(nyu_items(root, "train", list_file), os.path.join(root, "shards"), "nyu-train",
                            max_count=shard_size)
    urls = [os.path.join(root, "shards", s["name"]) for s in manifest["shards"]]
    rows = []
    for name, transform in (("decode + augment + 480x480 crop + collate", augment), ("decode + collate", prepare)):
        stream = build_stream(urls, transform, train=True, batch_size=batch_size, num_workers=workers,
                              shuffle_buffer=64, fields=("jpg", "depth.png"), rank=0, world_size=1)
        loose = torch.utils.data.DataLoader(LooseFiles(root, list_file, transform, 0), batch_size=batch_size,
                                            shuffle=True, num_workers=workers, drop_last=True)
        shard_iter, loose_iter = iter(stream), _cycle(loose)
        # Alternate the two sides and keep the median, so load from other processes hits both alike.
        rates = [(_rate(shard_iter, batches), _rate(loose_iter, batches)) for _ in range(rounds)]
        rows.append((name, float(np.median([r[0] for r in rates])), float(np.median([r[1] for r in rates]))))
    return rows


def _cycle(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96, help="synthetic 480x640 NYU pairs to generate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per round (after one warm-up)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: one core, in process)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds; the median is shown")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    parser.add_argument("--root", help="working folder (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.root or tmp, args.samples, args.batch_size, args.batches, args.workers, args.shard_size,
                   args.rounds)
    cores = max(args.workers, 1)
    print(f"\nNYU train pipeline, {args.batches} batches of {args.batch_size}, median of {args.rounds} rounds, "
          f"{cores} core(s); samples/s per core")
    print("| pipeline | shards (build_stream) | loose files (reference) | shards / loose |")
    print("|---|---|---|---|")
    for name, shard_rate, loose_rate in rows:
        print(f"| {name} | {shard_rate / cores:.1f} | {loose_rate / cores:.1f} | {shard_rate / loose_rate:.2f}x |")
    return 0
