"""NYUv2 in the reference depth code's layout -> shard items.

    <root>/sync/<scene>_<id>/rgb_XXXXX.jpg + sync_depth_XXXXX.png         (train)
    <root>/official_splits/test/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (test)

listed as ``/<dir>/rgb_XXXXX.jpg /<dir>/sync_depth_XXXXX.png`` (paths relative to ``sync`` or
``official_splits/test``) in ``train_list.txt`` / ``test_list.txt``. A ``<root>/nyu_depth_v2``
level, as in the reference's data folder, is accepted too.
"""

from __future__ import annotations

import functools
import json
import os
import re

from vpd_ray.data.writer import SourceItem, key_from_path, read_source, shuffled

SPLIT_DIRS = {"train": "sync", "test": os.path.join("official_splits", "test")}


def scene_class(list_path: str) -> tuple[str, int]:
    """Scene folder name and class id of a listed image, e.g. ``/kitchen_0028b/rgb_00045.jpg``.

    The id follows the reference exactly, so that reference checkpoints see the embedding they were
    trained with: the first name of ``NYU_CLASSES`` that is a substring of ``<dir>_<file>``
    (hence ``office_kitchen`` -> ``kitchen``, ``study_room`` -> ``study``), -1 if none.
    """
    from vpd_ray.model.text import NYU_CLASSES

    directory, filename = list_path.strip("/").split("/")[-2:]
    scene = re.sub(r"_\d+[a-z]?$", "", directory)
    probe = f"{directory}_{filename}"
    class_id = next((i for i, name in enumerate(NYU_CLASSES) if name in probe), -1)
    return scene, class_id


def _dataset_root(root: str) -> str:
    nested = os.path.join(root, "nyu_depth_v2")
    return nested if not os.path.isdir(os.path.join(root, "sync")) and os.path.isdir(nested) else root


def read_list(path: str) -> list[tuple[str, str]]:
    """``(rgb, depth)`` path pairs of a list file; extra columns (focal length) are ignored."""
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{number}: expected '<rgb> <depth>', got {line.strip()!r}")
            pairs.append((parts[0], parts[1]))
    return pairs


def load_pair(rgb: str, depth: str, meta: dict) -> dict[str, bytes]:
    """The sample's fields: image and depth bytes as stored, metadata as JSON."""
    return {"jpg": read_source(rgb, verify_image=True), "depth.png": read_source(depth, verify_image=True),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def nyu_items(root: str, split: str, list_file: str | None = None,
              shuffle_seed: int | None = None) -> list[SourceItem]:
    """One item per listed pair, keyed by the image path (e.g. ``sync__kitchen_0028b__rgb_00045``), in
    list order or, with ``shuffle_seed``, in that seed's :func:`~vpd_ray.data.writer.shuffled` order."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown NYU split {split!r}; known: {sorted(SPLIT_DIRS)}")
    root = _dataset_root(root)
    list_file = list_file or os.path.join(root, f"{split}_list.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"NYU list file {list_file} not found (give it with --list)")
    base = os.path.join(root, SPLIT_DIRS[split])
    items = []
    for rgb, depth in read_list(list_file):
        rel = os.path.join(SPLIT_DIRS[split], rgb.lstrip("/"))
        scene, class_id = scene_class(rgb)
        meta = {"source": rel, "depth_source": os.path.join(SPLIT_DIRS[split], depth.lstrip("/")),
                "scene": scene, "class_id": class_id, "split": split}
        paths = (os.path.join(base, rgb.lstrip("/")), os.path.join(base, depth.lstrip("/")))
        items.append(SourceItem(key=key_from_path(rel), load=functools.partial(load_pair, *paths, meta),
                                est_bytes=_size(paths[0]) + _size(paths[1]), source=rel))
    return shuffled(items, shuffle_seed)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
