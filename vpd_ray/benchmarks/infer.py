"""``python -m vpd_ray.bench infer``: batch inference images/s, Ray Data actor pool vs a plain loop.

Both sides run the same model package on the same images in the same run and write the same
outputs (16-bit depth PNGs): the plain loop is one process calling the predictor class directly
(load the package once, then read, decode, predict and write batch after batch); the Ray side is
``vpd_ray.infer``'s pipeline (Ray Data read -> ``map_batches`` on an actor pool). Times include
loading the model on both sides and, for Ray, starting the actors; ``ray.init`` itself is not timed.

Without ``--model`` the package is the tiny random-weight model of ``configs/sample.yaml``
(speed does not depend on the weights); the images are synthetic 480x640 frames, NYU's size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, count: int, hw: tuple[int, int], seed: int = 0) -> list[str]:
    """``count`` smooth random JPEG frames (quality 95) under ``root``."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, hw[0] // 40, hw[1] // 40), dtype=np.float32))
        field = torch.nn.functional.interpolate(coarse, size=hw, mode="bicubic", align_corners=False)[0]
        image = (field.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        path = root / f"frame_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(str(path))
    return paths


def tiny_package(out_dir: Path) -> str:
    """The sample config's tiny model as a package (random weights, no training)."""
    from vpd_ray.config import compose, to_yaml
    from vpd_ray.modeling import architecture, build_model
    from vpd_ray.package import export_package

    cfg = compose(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sample.yaml"))
    model = build_model(cfg)
    return export_package(model.state_dict(), to_yaml(cfg), architecture(model), str(out_dir))


def plain_loop(package: str, task: str, paths: list[str], root: str, out: str, batch_size: int) -> float:
    """Seconds for the single-process baseline, model loading included."""
    from vpd_ray.inference.predictor import Predictor

    start = time.perf_counter()
    predictor = Predictor(package, out, task, root=root, max_side=None)
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        predictor({"bytes": np.array([Path(p).read_bytes() for p in chunk], dtype=object),
                   "path": np.array(chunk, dtype=object)})
    return time.perf_counter() - start


def ray_path(package: str, task: str, input_dir: str, out: str, batch_size: int, concurrency: int) -> float:
    """Seconds for ``vpd_ray.infer``'s pipeline (actor start and model loading included)."""
    import io

    from vpd_ray.inference.runner import InferOptions, run_inference

    opts = InferOptions(model=package, input=input_dir, output=out, task=task, max_side=None,
                        batch_size=batch_size, concurrency=concurrency)
    start = time.perf_counter()
    summary = run_inference(opts, stream=io.StringIO())
    seconds = time.perf_counter() - start
    if summary.failed or summary.written != summary.images:
        raise RuntimeError(f"inference run incomplete: {summary.line(out)}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench infer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model package (default: the tiny sample model)")
    parser.add_argument("--task", help="task of a multi-task package")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="actor-pool sizes to time (default: 1 and 2 CPU actors, or one actor per GPU)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    args = parser.parse_args(argv)

    import ray
    import torch

    from vpd_ray.inference.runner import resolve_task

    with tempfile.TemporaryDirectory(prefix="vpd_bench_infer_") as tmp:
        tmp_path = Path(tmp)
        package = args.model or tiny_package(tmp_path / "package")
        task = resolve_task(package, args.task)
        (tmp_path / "images").mkdir()
        paths = make_images(tmp_path / "images", args.images, tuple(args.size))
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            rows = [("plain loop (1 process)", plain_loop(package, task, paths, str(tmp_path / "images"),
                                                          str(tmp_path / "out_loop"), args.batch_size))]
            print(f"plain loop: {rows[0][1]:.1f} s", flush=True)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            for n in args.concurrency or ([gpus] if gpus else [1, 2]):
                seconds = ray_path(package, task, str(tmp_path / "images"), str(tmp_path / f"out_ray{n}"),
                                   args.batch_size, n)
                rows.append((f"Ray Data, {n} actor(s)", seconds))
                print(f"Ray Data, {n} actor(s): {seconds:.1f} s", flush=True)
        finally:
            ray.shutdown()

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.images} images of {args.size[0]}x{args.size[1]}, batch {args.batch_size}, task {task}, {device}")
    print("| path | seconds | images/s | vs plain loop |")
    print("|---|---|---|---|")
    baseline = rows[0][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {args.images / seconds:.2f} | {baseline / seconds:.2f}x |")
    return 0
