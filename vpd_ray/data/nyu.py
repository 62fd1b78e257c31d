"""NYUv2 in the reference depth code's layout -> shard items.

    <root>/sync/<scene>_<id>/rgb_XXXXX.jpg + sync_depth_XXXXX.png         (train)
    <root>/official_splits/test/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (test)

listed as ``/<dir>/rgb_XXXXX.jpg /<dir>/sync_depth_XXXXX.png`` (paths relative to ``sync`` or
``official_splits/test``) in ``train_list.txt`` / ``test_list.txt``. A ``<root>/nyu_depth_v2``
level, as in the reference's data folder, is accepted too. A list file that cannot be found, is
malformed or lists nothing is a :class:`~vpd_ray.data.writer.ConversionError` naming it.
"""

from __future__ import annotations

import functools
import json
import os
import re

from vpd_ray.data.writer import (
    ConversionError,
    SourceItem,
    key_from_path,
    read_map,
    read_source,
    shuffled,
)

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


def find_list(root: str, split: str, list_file: str | None = None) -> str:
    """The list file to read: ``list_file`` as the user means it, else ``<split>_list.txt``.

    An absolute path is taken as is. A relative one is taken from the current folder when it is
    there (what a shell would complete), else from the dataset's folder (``root``, or its
    ``nyu_depth_v2`` level), where the reference keeps train_list.txt and test_list.txt; the
    default name is looked for there only. The error names every place looked at.
    """
    name = list_file or f"{split}_list.txt"
    if os.path.isabs(name):
        places = [name]
    else:
        folders = dict.fromkeys([_dataset_root(root), root, os.path.join(root, "nyu_depth_v2")])
        places = ([name] if list_file else []) + [os.path.join(folder, name) for folder in folders]
    found = next((place for place in places if os.path.isfile(place)), None)
    if found is None:
        what = f"--list {name}" if list_file else f"list file {name} (the default for --split {split})"
        hint = "" if list_file else "; give it with --list"
        raise ConversionError(f"NYU {what} not found; looked at "
                              f"{', '.join(os.path.abspath(place) for place in places)}{hint}")
    return found


def read_list(path: str) -> list[tuple[str, str]]:
    """``(rgb, depth)`` path pairs of a list file; extra columns (focal length) are ignored."""
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ConversionError(f"{path}:{number}: expected '<rgb> <depth>', got {line.strip()!r}")
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ConversionError(f"{path} lists no samples")
    return pairs


def load_pair(rgb: str, depth: str, meta: dict) -> dict[str, bytes]:
    """The sample's fields: image bytes as stored, the depth PNG's millimetres as a zmap, metadata as JSON."""
    from vpd_ray.data.decode import decode_depth_mm

    return {"jpg": read_source(rgb, verify_image=True), "depth.zmap": read_map(depth, decode_depth_mm),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def nyu_items(root: str, split: str, list_file: str | None = None,
              shuffle_seed: int | None = None) -> list[SourceItem]:
    """One item per listed pair, keyed by the image path (e.g. ``sync__kitchen_0028b__rgb_00045``), in
    list order or, with ``shuffle_seed``, in that seed's :func:`~vpd_ray.data.writer.shuffled` order."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown NYU split {split!r}; known: {sorted(SPLIT_DIRS)}")
    pairs = read_list(find_list(root, split, list_file))
    base = os.path.join(_dataset_root(root), SPLIT_DIRS[split])
    items = []
    for rgb, depth in pairs:
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
