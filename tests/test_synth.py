"""Synthetic generators and the committed sample shards: exact, reproducible, and shaped as the
tasks expect."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from vpd_ray.data import synth
from vpd_ray.data.decode import decode_sample, wanted_extensions
from vpd_ray.data.pipeline import build_stream
from vpd_ray.data.tario import iter_raw_samples
from vpd_ray.data.writer import write_shards
from vpd_ray.model.text import NYU_CLASSES

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "shards", "sample")


def _decoded(prefix: str, count: int = 16) -> list[dict]:
    url = os.path.join(SAMPLE, f"{prefix}-000000.tar")
    return [decode_sample(raw, key, url, wanted_extensions(None)) for key, raw in iter_raw_samples(url, 0, count)]


def test_sample_manifests_match_the_committed_shards():
    names = sorted(n for n in os.listdir(SAMPLE) if n.endswith(".manifest.json"))
    assert [n.split(".")[0] for n in names] == sorted(f"{k}-{s}" for k in ("depth", "refer", "seg") for s in ("train", "val"))
    for name in names:
        manifest = json.load(open(os.path.join(SAMPLE, name)))
        assert manifest["num_samples"] == (256 if "train" in name else 64) and manifest["num_missing"] == 0
        for shard in manifest["shards"]:
            data = open(os.path.join(SAMPLE, shard["name"]), "rb").read()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]


def test_regeneration_is_byte_identical(tmp_path):
    """The README's command reproduces the committed shards (seg-val: the fastest generator)."""
    manifest = write_shards(synth.synth_items("seg", 64, 1), str(tmp_path), "seg-val", max_count=128)
    committed = json.load(open(os.path.join(SAMPLE, "seg-val.manifest.json")))
    assert manifest["shards"] == committed["shards"]


def test_depth_samples_are_rooms_with_metric_depth_and_a_scene_class():
    for sample in _decoded("depth-val"):
        assert sample["image"].shape == (128, 128, 3) and sample["image"].dtype == np.uint8
        depth = sample["depth"]
        assert depth.shape == (128, 128) and depth.dtype == np.float32
        assert 0.5 < depth.min() and depth.max() <= 10.0
        meta = sample["meta"]
        assert NYU_CLASSES[meta["class_id"]] == meta["scene"] and meta["scene"] in synth.DEPTH_SCENES
    # Depth is visible in the image: the image darkens with distance.
    sample = _decoded("depth-val", 1)[0]
    near, far = sample["depth"] < np.quantile(sample["depth"], 0.2), sample["depth"] > np.quantile(sample["depth"], 0.8)
    assert sample["image"][near].mean() > sample["image"][far].mean()


def test_seg_labels_follow_the_ade_convention():
    seen = set()
    for sample in _decoded("seg-val"):
        label = sample["label"]
        assert label.shape == sample["image"].shape[:2] and label.dtype == np.uint8
        seen |= set(np.unique(label).tolist())
        assert sample["meta"]["classes"] == list(synth.SEG_CLASSES)
    assert seen == set(range(len(synth.SEG_CLASSES)))  # 0 = other, 1..6 all occur


def test_refer_samples_pair_two_objects_of_one_scene_named_by_colour():
    samples = _decoded("refer-val")
    for sample in samples:
        mask, sentences = sample["mask"], sample["meta"]["sentences"]
        assert mask.shape == (128, 128) and set(np.unique(mask).tolist()) == {0, 1}
        assert 2 <= len(sentences) <= 3 and sentences[1].split()[1] in synth.REFER_COLOURS
        assert set(" ".join(sentences).split()) <= set(synth.SYNTH_REFER_WORDS)
    for first, second in zip(samples[::2], samples[1::2]):
        assert first["meta"]["image_id"] == second["meta"]["image_id"]
        np.testing.assert_array_equal(first["image"], second["image"])
        assert first["meta"]["ann_id"] != second["meta"]["ann_id"]
        assert not (first["mask"] & second["mask"]).any()


def _matches(phrase: str, objects: list[dict]) -> list[int]:
    """Indices of the objects a phrase describes, read literally (an independent interpreter)."""
    words = phrase.split()[1:]  # drop "the"
    where = None
    if words[0] in ("leftmost", "rightmost"):
        where, words = words[0], words[1:]
    elif words[-3:-1] == ["on", "the"]:
        where, words = {"left": "leftmost", "right": "rightmost"}[words[-1]], words[:-3]
    words = [w for w in words if w not in ("one", "object")]
    group = [i for i, o in enumerate(objects) if all(w in (o["colour"], o["shape"]) for w in words)]
    if where is None:
        return group
    pick = min if where == "leftmost" else max
    return [pick(group, key=lambda i: objects[i]["cx"])]


def test_each_phrase_picks_out_exactly_one_object():
    rng = np.random.default_rng(0)
    colours = list(synth.REFER_COLOURS)
    for _ in range(300):
        objects = [{"cx": float(x), "colour": colours[int(rng.integers(3))], "shape": synth.REFER_SHAPES[int(rng.integers(2))]}
                   for x in rng.permutation(100)[: int(rng.integers(3, 6))]]
        for i in range(len(objects)):
            for phrase in synth.referring_phrases(objects, i):
                assert _matches(phrase, objects) == [i], (phrase, objects, i)
                if "left" in phrase or "right" in phrase:  # "on the left" is used only for a pair
                    assert "most" in phrase or len(_matches(phrase.rsplit(" on the", 1)[0], objects)) == 2


@pytest.mark.parametrize("task_name, prefix, overrides", [
    ("depth", "depth-val", {"crop_size": [96, 112]}),
    ("seg", "seg-val", {"num_classes": 6, "scale": [128, 128], "crop_size": [96, 96]}),
])
def test_tasks_transform_sample_shards_into_batches(task_name, prefix, overrides):
    from vpd_ray.tasks import get_task

    task_cls = get_task(task_name)
    task = task_cls(task_cls.config_class(**overrides))
    url = os.path.join(SAMPLE, f"{prefix}-000000.tar")
    train = build_stream(url, task.train_transform, train=True, batch_size=4, fields=task.fields, num_workers=0,
                         rank=0, world_size=1)
    batch = next(iter(train))
    assert batch["image"].shape[0] == 4 and batch["image"].shape[1] == 3
    if task_name == "depth":
        assert batch["image"].shape[-2:] == (96, 112) and batch["depth"].shape == (4, 1, 96, 112)
        assert ((batch["class_id"] >= 0) & (batch["class_id"] < len(NYU_CLASSES))).all()
    else:
        label = batch["label"]
        assert label.shape == (4, 96, 96) and set(label.unique().tolist()) <= set(range(6)) | {255}
    evaluation = build_stream(url, task.eval_transform, train=False, batch_size=1, fields=task.fields, num_workers=0,
                              rank=0, world_size=1)
    assert sum(1 for _ in evaluation) == 64
