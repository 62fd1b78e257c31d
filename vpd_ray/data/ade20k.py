"""ADE20K (``ADEChallengeData2016``) -> shard items.

    <root>/images/{training,validation}/ADE_*.jpg
    <root>/annotations/{training,validation}/ADE_*.png   (0 = other, 1..150 = classes)

The image is stored as read, the label PNG's values as a zmap field (:func:`~vpd_ray.data.writer.read_map`);
every image is paired with the annotation of the same stem.
"""

from __future__ import annotations

import functools
import json
import os

from vpd_ray.data.writer import SourceItem, read_map, read_source, shuffled

SPLIT_DIRS = {"train": "training", "val": "validation"}


def load_pair(image: str, label: str, meta: dict) -> dict[str, bytes]:
    from vpd_ray.data.decode import decode_index_png

    return {"jpg": read_source(image, verify_image=True), "label.zmap": read_map(label, decode_index_png),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def ade20k_items(root: str, split: str, shuffle_seed: int | None = None) -> list[SourceItem]:
    """One item per image, keyed by its stem (``ADE_train_00000001``), in file-name order or, with
    ``shuffle_seed``, in that seed's :func:`~vpd_ray.data.writer.shuffled` order."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown ADE20K split {split!r}; known: {sorted(SPLIT_DIRS)}")
    image_dir = os.path.join(root, "images", SPLIT_DIRS[split])
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir} not found: --root must be the ADEChallengeData2016 folder")
    items = []
    for name in sorted(n for n in os.listdir(image_dir) if n.endswith(".jpg")):
        stem = name[: -len(".jpg")]
        rel_image = os.path.join("images", SPLIT_DIRS[split], name)
        rel_label = os.path.join("annotations", SPLIT_DIRS[split], stem + ".png")
        meta = {"source": rel_image, "label_source": rel_label, "split": split}
        paths = (os.path.join(root, rel_image), os.path.join(root, rel_label))
        size = os.path.getsize(paths[0]) + (os.path.getsize(paths[1]) if os.path.exists(paths[1]) else 0)
        items.append(SourceItem(key=stem, load=functools.partial(load_pair, *paths, meta), est_bytes=size,
                                source=rel_image))
    return shuffled(items, shuffle_seed)
