"""``python -m vpd_ray.shards``: convert published datasets or generate synthetic data into shards.

    python -m vpd_ray.shards nyu --root NYU --split train --list train_list.txt --out shards/nyu
    python -m vpd_ray.shards ade20k --root ADEChallengeData2016 --split val --out shards/ade
    python -m vpd_ray.shards refcoco --root refer/data --dataset refcoco --split-by unc --split val --out shards/refcoco
    python -m vpd_ray.shards synth-depth --out shards/sample --n 256 --seed 0 --name depth-train

Each command writes ``<out>/<name>-NNNNNN.tar`` and ``<out>/<name>.manifest.json``; re-running the
same command resumes an interrupted conversion. Train splits are written in a seeded shuffled order
(``--shuffle-seed``, default 0; ``--no-shuffle`` keeps list order), other splits in list order. Exit
status 1 with a one-line message when the sources are unusable (a list file not found, malformed or
empty; more than ``--max-missing`` of the sources, or all of them, missing or unreadable; stale
shards), 2 for arguments argparse refuses. A conversion that fails its limits, or is interrupted,
leaves its manifest saying ``"complete": false`` with the reason, and training refuses those shards
until a re-run completes.
"""

from __future__ import annotations

import argparse
import sys

from vpd_ray.data.writer import ConversionError, SourceItem, write_shards


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 128x128, got {text!r}") from None
    return h, w


def _common(p: argparse.ArgumentParser, default_name: str | None = None) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=default_name, help="shard name prefix (default: <dataset>-<split>)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-bytes", type=int, default=1 << 30, help="bytes per shard, about, at most")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--max-missing", type=float, default=0.01, help="share of missing sources tolerated")


def _order(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--shuffle-seed", type=int, help="write the samples in this seed's shuffled order "
                                                        "(default: 0 for --split train, else list order)")
    group.add_argument("--no-shuffle", action="store_true", help="write the samples in list order")


def shuffle_seed(args: argparse.Namespace) -> int | None:
    """The seed of the written order, None for list order.

    Train splits are shuffled by default (why: :func:`vpd_ray.data.writer.shuffled`); other splits
    keep list order, so that evaluation and inference outputs come in dataset order.
    """
    if args.no_shuffle:
        return None
    if args.shuffle_seed is not None:
        return args.shuffle_seed
    return 0 if args.split == "train" else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("nyu", help="NYUv2 (sync + official_splits, listed by train_list/test_list)")
    p.add_argument("--root", required=True, help="folder holding sync/ and official_splits/")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--list", help="list file of '/<dir>/rgb_X.jpg /<dir>/sync_depth_X.png' lines; a relative "
                                  "path is looked for in the current folder, then in --root "
                                  "(default: <root>/<split>_list.txt)")
    _order(p)
    _common(p)
    p = sub.add_parser("ade20k", help="ADE20K (ADEChallengeData2016)")
    p.add_argument("--root", required=True, help="the ADEChallengeData2016 folder")
    p.add_argument("--split", required=True, choices=["train", "val"])
    _order(p)
    _common(p)
    p = sub.add_parser("refcoco", help="RefCOCO / RefCOCO+ / G-Ref (refer toolkit layout)")
    p.add_argument("--root", required=True, help="folder holding <dataset>/refs(<split-by>).p, "
                                                 "<dataset>/instances.json and images/train2014/")
    p.add_argument("--dataset", required=True, choices=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--split-by", required=True, choices=["unc", "umd", "google"])
    p.add_argument("--split", required=True, help="train, val, test, testA, testB")
    p.add_argument("--images", help="folder of COCO_train2014_*.jpg (default: <root>/images/train2014)")
    _order(p)
    _common(p)
    for kind in ("depth", "seg", "refer"):
        p = sub.add_parser(f"synth-{kind}", help=f"synthetic {kind} data (vpd_ray.data.synth)")
        p.add_argument("--n", type=int, required=True, help="number of samples")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=_size, default=None, help="HxW (default 128x128)")
        _common(p, default_name=None)
    return parser


def collect(args: argparse.Namespace) -> tuple[list[SourceItem], str, dict]:
    """The items, default shard prefix and manifest info of one command."""
    if args.command.startswith("synth-"):
        from vpd_ray.data.synth import synth_items

        kind = args.command.split("-", 1)[1]
        info = {"dataset": args.command, "seed": args.seed, "n": args.n}
        return synth_items(kind, args.n, args.seed, args.size), f"{kind}-s{args.seed}", info
    seed = shuffle_seed(args)
    if args.command == "nyu":
        from vpd_ray.data.nyu import nyu_items

        items, prefix, info = nyu_items(args.root, args.split, args.list, seed), "nyu", {"dataset": "nyu"}
    elif args.command == "ade20k":
        from vpd_ray.data.ade20k import ade20k_items

        items, prefix, info = ade20k_items(args.root, args.split, seed), "ade20k", {"dataset": "ade20k"}
    else:
        from vpd_ray.data.refcoco import refcoco_items

        items = refcoco_items(args.root, args.dataset, args.split_by, args.split, args.images, seed)
        prefix, info = f"{args.dataset}-{args.split_by}", {"dataset": args.dataset, "split_by": args.split_by}
    return items, f"{prefix}-{args.split}", {**info, "split": args.split, "shuffle_seed": seed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        items, prefix, info = collect(args)
        manifest = write_shards(items, args.out, args.name or prefix, max_count=args.max_count,
                                max_bytes=args.max_bytes, workers=args.workers, max_missing=args.max_missing,
                                info=info)
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shard(s) under {args.out}, "
          f"{manifest['num_missing']} missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
