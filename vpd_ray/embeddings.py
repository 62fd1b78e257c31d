"""``python -m vpd_ray.embeddings``: compute VPD class embeddings with a CLIP text model.

    python -m vpd_ray.embeddings --clip openai/clip-vit-large-patch14 --classes nyu --out nyu_classes.safetensors

``--classes`` is a built-in set (``nyu``: 27 NYUv2 scene types, ``ade20k``: 150 ADE20K classes) or a
text file with one class name per line. Output: safetensors with a ``class_embeddings`` tensor [N, D]
(D = 768 for CLIP ViT-L/14) and the class names in its metadata; point ``tasks.<name>.class_embeddings``
at it.
"""

from __future__ import annotations

import argparse
import os
import sys


def read_class_names(spec: str) -> list[str]:
    """A built-in set name, or a file with one class name per line (blank lines ignored)."""
    from vpd_ray.model.text import CLASS_SETS

    if spec in CLASS_SETS:
        return list(CLASS_SETS[spec])
    if not os.path.isfile(spec):
        raise ValueError(f"--classes {spec!r} is neither a built-in set ({', '.join(CLASS_SETS)}) nor a file")
    with open(spec, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"--classes file {spec!r} holds no class names")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--clip", required=True, help="CLIP text model + tokenizer: local folder or hub id")
    parser.add_argument("--classes", required=True, help="nyu | ade20k | FILE (one class name per line)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--device", default="cpu", help="torch device for CLIP (default: cpu)")
    args = parser.parse_args(argv)
    try:
        names = read_class_names(args.classes)
        from vpd_ray.model.text import ClipText, compute_class_embeddings, save_class_embeddings

        vectors = compute_class_embeddings(names, ClipText(args.clip, device=args.device), progress=True)
        save_class_embeddings(args.out, vectors, names)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {vectors.shape[0]} classes x {vectors.shape[1]} dims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
