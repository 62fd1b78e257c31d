"""``python -m vpd_ray.captions SHARDS --model CAPTIONER --out DIR``: caption every image of a shard set.

    python -m vpd_ray.captions "shards/nyu/nyu-train-{000000..000024}.tar" --model models/blip-large --out shards/nyu-captioned

EVP / TADP's per-image text context (``tasks.<name>.context: caption``). ``SHARDS``: a brace pattern,
comma list or folder of webdataset shards; ``--model``: a local transformers image-to-text folder (BLIP,
BLIP-2, GIT: model and processor saved with ``save_pretrained``). ``DIR`` gets each shard again, same
name, same samples, plus a ``txt`` caption per sample, and ``<prefix>.manifest.json``
(:mod:`vpd_ray.data.captions`: why whole shards); train on DIR's shards. Captioning runs on Ray Data,
one actor per GPU (CPU otherwise), each loading the model once. Re-running the same command skips the
shards already written.

Exit codes: 0 when every shard is captioned; 2 for bad input, in one line before any actor starts (a
``SHARDS`` that names nothing or an incomplete conversion, a ``--model`` that is no captioner, a
``--out`` that is the shards' folder or holds shards of other sources) or when a shard has a field
outside the decode whitelist (the manifests then say incomplete).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vpd_ray.data.captions import (
    CaptionOptions,
    caption_info,
    check_captioner,
    plan_captions,
    run_caption_job,
)
from vpd_ray.ray_data_job import run_ray_data_job


def parse_args(argv: list[str] | None = None) -> tuple[CaptionOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.captions", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", metavar="SHARDS", help="webdataset shards: brace pattern, comma list or folder")
    parser.add_argument("--model", required=True, help="local transformers image-to-text folder (BLIP, BLIP-2, GIT)")
    parser.add_argument("--out", required=True, help="output folder for the captioned shards and their manifests")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="caption length at most, in the captioner's tokens")
    parser.add_argument("--concurrency", type=int, help="captioning actors (default: one per GPU, else one)")
    parser.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="CPUs per actor on a CPU-only cluster")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "concurrency"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} {value}: give 1 or more")
    opts = CaptionOptions(shards=args.shards, model=args.model, out=args.out, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                          num_cpus_per_actor=args.num_cpus_per_actor)
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)

    def check() -> Any:  # bad SHARDS / --model / --out
        check_captioner(opts.model)
        return plan_captions(opts.shards, opts.out, caption_info(opts))

    code, summary = run_ray_data_job("captions", check, lambda plan: run_caption_job(opts, plan=plan),
                                     args.ray_address, args.num_cpus)
    if summary is not None:
        print(summary.line(opts.out))
    return code


if __name__ == "__main__":
    sys.exit(main())
