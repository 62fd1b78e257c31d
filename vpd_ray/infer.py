"""``python -m vpd_ray.infer --model PACKAGE --input PATH_OR_GLOB_OR_SHARDS --output DIR``.

Batch offline inference on Ray Data: images are read by Ray, a pool of actors (one GPU each where
the cluster has GPUs, CPU otherwise) each load the model package once and write one output per
input, named after it. Outputs that exist are skipped, unreadable images are listed in
``DIR/infer_report.json``; the last line printed is the summary (images, failures, images/s).
"""

from __future__ import annotations

import argparse
import sys

from vpd_ray.inference.runner import InferOptions, resolve_task, run_inference
from vpd_ray.inference.sources import resolve_input


def parse_args(argv: list[str] | None = None) -> tuple[InferOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.infer", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", required=True, help="model package folder (model.safetensors + config.yaml)")
    parser.add_argument("--input", required=True,
                        help="image folder (recursive), glob, webdataset shards (x-{000..009}.tar) or a JSONL of "
                             '{"image": ..., "sentence": ...} lines for referring segmentation')
    parser.add_argument("--output", required=True, help="output folder; names mirror the input names, suffix .png")
    parser.add_argument("--task", help="task to run when the package holds several")
    parser.add_argument("--protocol", action="store_true",
                        help="use the task's test-time protocol (depth: sliding windows + flip) instead of one pass")
    parser.add_argument("--preview", action="store_true", help="depth: also write a colour-mapped DIR/preview/NAME.jpg")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="downscale larger images to this longer side for the model (outputs keep the input size; "
                             "0: never)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    parser.add_argument("--concurrency", type=int, help="number of model actors (default: one per GPU, else one)")
    parser.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="CPUs per actor on a CPU-only cluster")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    args = parser.parse_args(argv)
    opts = InferOptions(model=args.model, input=args.input, output=args.output, task=args.task,
                        protocol=args.protocol, preview=args.preview, max_side=args.max_side or None,
                        batch_size=args.batch_size, concurrency=args.concurrency,
                        num_cpus_per_actor=args.num_cpus_per_actor)
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    try:  # a wrong --model/--task/--input is one line before any Ray process starts
        resolve_task(opts.model, opts.task)
        resolve_input(opts.input)
    except (FileNotFoundError, ValueError) as err:
        print(f"infer: {err}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=args.ray_address, num_cpus=args.num_cpus, include_dashboard=False)
    try:
        summary = run_inference(opts)
    finally:
        ray.shutdown()
    print(summary.line(opts.output))
    return 1 if summary.failed and not summary.written else 0


if __name__ == "__main__":
    sys.exit(main())
