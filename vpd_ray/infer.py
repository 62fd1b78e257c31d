"""``python -m vpd_ray.infer --model PACKAGE --input PATH_OR_GLOB_OR_SHARDS --output DIR``.

Batch offline inference on Ray Data: images are read by Ray, a pool of actors (one GPU each where
the cluster has GPUs, CPU otherwise) each load the model package once and write one output per
input, named after it. Outputs that exist are skipped, unreadable images are listed in
``DIR/infer_report.json``; the last line printed is the summary (images, failures, images/s).

Exit codes: 0 when every input was written or skipped; 1 when any failed (the rest written; with
``--max-failed N`` the job stops once more than N failed); 2 for a bad ``--model``/``--task``/
``--input`` or a shard with a field outside the decode whitelist (one line, nothing of it written).
"""

from __future__ import annotations

import argparse
import sys

from vpd_ray.inference.runner import InferOptions, resolve_task, run_inference
from vpd_ray.inference.sources import resolve_input
from vpd_ray.ray_data_job import run_ray_data_job


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
    parser.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                        help="also write OUT/preview/NAME.png, the task's picture of each prediction (depth with a "
                             "colour bar in metres on the model's range, seg with a class legend, refer with its "
                             "sentence); on by default")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="downscale larger images to this longer side for the model (outputs keep the input size; "
                             "0: never)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: run the model under bf16 autocast (weights stay fp32; faster on GPUs)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    parser.add_argument("--concurrency", type=int, help="number of model actors (default: one per GPU, else one)")
    parser.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="CPUs per actor on a CPU-only cluster")
    parser.add_argument("--max-failed", type=int, metavar="N",
                        help="stop once more than N inputs failed (default: never stop early; exit 1 if any failed)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    args = parser.parse_args(argv)
    if args.max_failed is not None and args.max_failed < 0:
        parser.error(f"--max-failed {args.max_failed}: give a count of 0 or more")
    opts = InferOptions(model=args.model, input=args.input, output=args.output, task=args.task,
                        protocol=args.protocol, preview=args.preview, max_side=args.max_side or None,
                        batch_size=args.batch_size, concurrency=args.concurrency,
                        num_cpus_per_actor=args.num_cpus_per_actor, max_failed=args.max_failed, dtype=args.dtype)
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)

    def check() -> None:  # a wrong --model/--task/--input
        resolve_task(opts.model, opts.task)
        resolve_input(opts.input)

    code, summary = run_ray_data_job("infer", check, lambda _: run_inference(opts), args.ray_address, args.num_cpus)
    if summary is None:
        return code
    print(summary.line(opts.output))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
