"""RefCOCO / RefCOCO+ / G-Ref (the ``refer`` toolkit layout) -> shard items, one per ref.

    <root>/<dataset>/refs(<split_by>).p     pickled list of refs (image_id, ann_id, split, sentences)
    <root>/<dataset>/instances.json         COCO images and annotations (polygons or RLE)
    <images>/COCO_train2014_%012d.jpg       default <root>/images/train2014

``refs(*).p`` is the one pickle vpd_ray reads, and only from the user's own dataset folder: a
restricted unpickler accepts builtin containers, strings and numbers and refuses every global, so
even a tampered file cannot run code. The target mask is rasterised once with pycocotools and
stored as a 0/1 zmap field; like the reference (LAVT's ``REFER.getMask`` then ``annot[m == 1] = 1``),
pixels covered by two polygons of the same object count as background.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from typing import Any

import numpy as np

from vpd_ray.data.writer import SourceItem, UnreadableSourceError, read_source, shuffled
from vpd_ray.data.zmap import encode_zmap


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: refs files hold only lists, dicts, str and numbers")


def load_refs(path: str) -> list[dict]:
    """The refs of a ``refs(*).p`` file, through the restricted unpickler."""
    with open(path, "rb") as f:
        refs = _DataOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def rasterise(segmentation: Any, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W]`` 0/1 mask of a COCO polygon list or RLE (overlaps of parts -> 0, as the reference)."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list) or isinstance(segmentation.get("counts"), list):  # polygons / raw RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:  # compressed RLE, counts as str in JSON
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    m = coco_mask.decode(rle)
    counts = m.sum(axis=2) if m.ndim == 3 else m
    return (counts == 1).astype(np.uint8)


def load_ref(image_path: str, segmentation: Any, height: int, width: int, meta: dict) -> dict[str, bytes]:
    image = read_source(image_path, verify_image=True)
    try:
        mask = rasterise(segmentation, height, width)
    except Exception as err:  # pycocotools raises plain Exceptions on malformed segmentations
        raise UnreadableSourceError(f"ann {meta['ann_id']}: bad segmentation ({err})") from None
    return {"jpg": image, "mask.zmap": encode_zmap(mask), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def refcoco_items(root: str, dataset: str, split_by: str, split: str, images: str | None = None,
                  shuffle_seed: int | None = None) -> list[SourceItem]:
    """One item per ref of ``split``, keyed ``<dataset>_<split_by>_ref<ref_id>``, in ref-id order or,
    with ``shuffle_seed``, in that seed's :func:`~vpd_ray.data.writer.shuffled` order."""
    folder = os.path.join(root, dataset)
    refs_path = os.path.join(folder, f"refs({split_by}).p")
    if not os.path.isfile(refs_path):
        raise FileNotFoundError(f"{refs_path} not found (is --root the refer data folder and --split-by right?)")
    with open(os.path.join(folder, "instances.json")) as f:
        instances = json.load(f)
    anns = {a["id"]: a for a in instances["annotations"]}
    image_info = {im["id"]: im for im in instances["images"]}
    images = images or os.path.join(root, "images", "train2014")
    refs = sorted((r for r in load_refs(refs_path) if r["split"] == split), key=lambda r: r["ref_id"])
    if not refs:
        raise FileNotFoundError(f"no refs with split {split!r} in {refs_path}")
    prefix = dataset.replace("+", "plus")
    items = []
    for ref in refs:
        ann, info = anns[ref["ann_id"]], image_info[ref["image_id"]]
        name = f"COCO_train2014_{ref['image_id']:012d}.jpg"
        meta = {"source": f"train2014/{name}", "dataset": dataset, "split_by": split_by, "split": split,
                "ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                "category_id": ref.get("category_id"), "sentences": [s["raw"] for s in ref["sentences"]],
                "sent_ids": [s.get("sent_id") for s in ref["sentences"]]}
        path = os.path.join(images, name)
        load = functools.partial(load_ref, path, ann["segmentation"], info["height"], info["width"], meta)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        items.append(SourceItem(key=f"{prefix}_{split_by}_ref{ref['ref_id']}", load=load, est_bytes=size + 2048,
                                source=meta["source"]))
    return shuffled(items, shuffle_seed)
