"""Shard writers: fake trees in the published NYU / ADE20K / RefCOCO layouts convert and read back
bit-identical; train splits in a seeded order; missing sources; resume after a killed conversion;
the refs pickle is data-only; an interrupted conversion is marked incomplete. Bad NYU input:
test_shards_bad_input.py."""

from __future__ import annotations

import functools
import json
import os
import pickle

import numpy as np
import pytest

from vpd_ray import shards as cli
from vpd_ray.data import writer
from vpd_ray.data.decode import (
    decode_depth,
    decode_depth_zmap,
    decode_index_png,
    decode_index_zmap,
)
from vpd_ray.data.refcoco import load_refs, rasterise
from vpd_ray.data.tario import expand_urls, iter_raw_samples, shard_counts
from vpd_ray.data.writer import (
    ConversionError,
    SourceItem,
    encode_jpeg,
    encode_png,
    write_shards,
)
from vpd_ray.data.zmap import decode_zmap
from vpd_ray.errors import DataError


def _jpeg(path, seed: int, hw=(12, 16)) -> bytes:
    data = encode_jpeg(np.random.default_rng(seed).integers(0, 256, hw + (3,), dtype=np.uint8))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _png(path, array) -> bytes:
    data = encode_png(array)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _manifest(out: str, prefix: str) -> dict:
    return json.load(open(os.path.join(out, f"{prefix}.manifest.json")))


def _read_all(out: str, prefix: str) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in _manifest(out, prefix)["shards"]:
        samples.update(dict(iter_raw_samples(os.path.join(out, shard["name"]))))
    return samples


def write_nyu_tree(root, dirs: dict[str, list[str]], frames) -> dict:
    """sync/<scene>_<id>/ (train) + official_splits/test/<scene>/ (test) + both list files, as published.

    ``dirs``: the folders of each split, each holding ``frames``, listed folder by folder. Returns
    ``{(folder, frame): (rgb bytes, depth PNG bytes, depth array)}``.
    """
    files = {}
    for split, split_dir in (("train", "sync"), ("test", "official_splits/test")):
        lines = []
        for rel_dir in dirs.get(split, []):
            base = root / split_dir / rel_dir
            for frame in frames:
                depth = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 50 + frame)
                rgb = _jpeg(str(base / f"rgb_{frame:05d}.jpg"), frame)
                files[(rel_dir, frame)] = (rgb, _png(str(base / f"sync_depth_{frame:05d}.png"), depth), depth)
                lines.append(f"/{rel_dir}/rgb_{frame:05d}.jpg /{rel_dir}/sync_depth_{frame:05d}.png 518.8579")
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture()
def nyu_tree(tmp_path):
    root = tmp_path / "nyu"
    files = write_nyu_tree(root, {"train": ["kitchen_0028b", "office_kitchen_0003"], "test": ["bathroom"]}, (45, 46))
    return root, files


def test_nyu_train_and_test_read_back_bit_identical(nyu_tree, tmp_path):
    root, files = nyu_tree
    out = str(tmp_path / "out")
    for split in ("train", "test"):
        assert cli.main(["nyu", "--root", str(root), "--split", split, "--out", out, "--max-count", "3"]) == 0
    train, test = _read_all(out, "nyu-train"), _read_all(out, "nyu-test")
    assert sorted(train) == ["sync__kitchen_0028b__rgb_00045", "sync__kitchen_0028b__rgb_00046",
                             "sync__office_kitchen_0003__rgb_00045", "sync__office_kitchen_0003__rgb_00046"]
    sample = train["sync__office_kitchen_0003__rgb_00046"]
    rgb, depth_png, depth = files[("office_kitchen_0003", 46)]
    assert sample["jpg"] == rgb and "depth.png" not in sample  # the image as stored, the depth as a zmap
    assert np.array_equal(decode_zmap(sample["depth.zmap"]), depth)  # the PNG's millimetres, exactly
    assert np.array_equal(decode_depth_zmap(sample["depth.zmap"]), decode_depth(depth_png))
    meta = json.loads(sample["json"])
    # the reference's first-substring rule: office_kitchen -> "kitchen" (15)
    assert meta == {"source": "sync/office_kitchen_0003/rgb_00046.jpg", "class_id": 15, "scene": "office_kitchen",
                    "depth_source": "sync/office_kitchen_0003/sync_depth_00046.png", "split": "train"}
    test_meta = json.loads(test["official_splits__test__bathroom__rgb_00045"]["json"])
    assert (test_meta["scene"], test_meta["class_id"]) == ("bathroom", 0)
    manifest = _manifest(out, "nyu-train")
    assert [s["count"] for s in manifest["shards"]] == [3, 1] and manifest["num_missing"] == 0


def _keys_in_order(out: str, prefix: str) -> list[str]:
    manifest = _manifest(out, prefix)
    return [key for shard in manifest["shards"] for key, _ in iter_raw_samples(os.path.join(out, shard["name"]))]


def test_train_split_is_written_in_a_seeded_order_that_reruns_hold_to(tmp_path, capsys):
    root, dirs = tmp_path / "nyu", ["kitchen_0001", "office_0002"]
    write_nyu_tree(root, {"train": dirs, "test": dirs}, range(6))
    listed = {split: [f"{base}__{d}__rgb_{f:05d}" for d in dirs for f in range(6)]
              for split, base in (("train", "sync"), ("test", "official_splits__test"))}

    def convert(out, split="train", *options):
        args = ["nyu", "--root", str(root), "--split", split, "--out", str(tmp_path / out), "--max-count", "5"]
        return cli.main(args + list(options))

    def manifest(out, split="train"):
        return json.load(open(tmp_path / out / f"nyu-{split}.manifest.json"))

    assert convert("a") == 0 and convert("b", "train", "--shuffle-seed", "0") == 0
    shuffled = _keys_in_order(str(tmp_path / "a"), "nyu-train")
    assert sorted(shuffled) == sorted(listed["train"]) and shuffled != listed["train"]
    assert manifest("a")["shards"] == manifest("b")["shards"] and manifest("a")["shuffle_seed"] == 0
    first = os.stat(tmp_path / "a" / "nyu-train-000000.tar").st_mtime_ns
    assert convert("a") == 0 and manifest("a")["shards"] == manifest("b")["shards"]  # resumed: nothing to do
    assert os.stat(tmp_path / "a" / "nyu-train-000000.tar").st_mtime_ns == first
    capsys.readouterr()
    for options in (["--shuffle-seed", "1"], ["--no-shuffle"]):
        assert convert("a", "train", *options) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "other options" in err and err.count("\n") == 1
    assert convert("c", "train", "--no-shuffle") == 0 and convert("c", "test") == 0
    assert _keys_in_order(str(tmp_path / "c"), "nyu-train") == listed["train"]
    assert _keys_in_order(str(tmp_path / "c"), "nyu-test") == listed["test"]
    assert manifest("c")["shuffle_seed"] is None and manifest("c", "test")["shuffle_seed"] is None
    with pytest.raises(SystemExit):
        convert("d", "train", "--shuffle-seed", "1", "--no-shuffle")


def test_ade20k_reads_back_and_lists_missing_annotations(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    files = {}
    for i in (1, 2, 3):
        stem = f"ADE_val_{i:08d}"
        image = _jpeg(str(root / "images/validation" / f"{stem}.jpg"), i)
        label = None
        if i != 2:  # annotation 2 is missing
            label = _png(str(root / "annotations/validation" / f"{stem}.png"), np.full((12, 16), i * 40, np.uint8))
        files[stem] = (image, label)
    out = str(tmp_path / "out")
    args = ["ade20k", "--root", str(root), "--split", "val", "--out", out]
    assert cli.main(args) == 1  # one of three missing is over the default 1%
    assert cli.main(args + ["--max-missing", "0.5"]) == 0
    samples = _read_all(out, "ade20k-val")
    assert sorted(samples) == ["ADE_val_00000001", "ADE_val_00000003"]
    for stem, sample in samples.items():
        assert sample["jpg"] == files[stem][0]
        assert np.array_equal(decode_zmap(sample["label.zmap"]), decode_index_png(files[stem][1]))
    manifest = _manifest(out, "ade20k-val")
    assert manifest["num_missing"] == 1 and manifest["missing"][0]["key"] == "ADE_val_00000002"
    assert "ADE_val_00000002.png" in manifest["missing"][0]["reason"]


@pytest.fixture()
def refcoco_tree(tmp_path):
    root = tmp_path / "refer"
    (root / "refcoco").mkdir(parents=True)
    images = [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 12, "width": 16}]
    polygon = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.pad(np.ones((3, 3), np.uint8), ((6, 3), (10, 3)))))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [{"id": 100, "image_id": 9, "segmentation": polygon, "category_id": 1, "iscrowd": 0},
            {"id": 101, "image_id": 9, "segmentation": rle, "category_id": 2, "iscrowd": 0}]
    (root / "refcoco" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    refs = [{"ref_id": r, "ann_id": a, "image_id": 9, "split": s, "category_id": 1, "sent_ids": [r * 10],
             "sentences": [{"raw": f"Ref {r} raw", "sent": f"ref {r}", "sent_id": r * 10, "tokens": []}]}
            for r, a, s in ((5, 100, "val"), (6, 101, "val"), (7, 100, "train"))]
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    image = _jpeg(str(root / "images/train2014/COCO_train2014_000000000009.jpg"), 9)
    return root, image, anns


def test_refcoco_one_sample_per_ref_with_rasterised_mask(refcoco_tree, tmp_path):
    root, image, anns = refcoco_tree
    out = str(tmp_path / "out")
    args = ["refcoco", "--root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--split", "val", "--out", out]
    assert cli.main(args) == 0
    samples = _read_all(out, "refcoco-unc-val")
    assert sorted(samples) == ["refcoco_unc_ref5", "refcoco_unc_ref6"]
    for key, ann in (("refcoco_unc_ref5", anns[0]), ("refcoco_unc_ref6", anns[1])):
        sample = samples[key]
        assert sample["jpg"] == image
        mask = decode_index_zmap(sample["mask.zmap"])
        assert np.array_equal(mask, rasterise(ann["segmentation"], 12, 16)) and set(np.unique(mask)) == {0, 1}
    assert decode_index_zmap(samples["refcoco_unc_ref6"]["mask.zmap"]).sum() == 9
    meta = json.loads(samples["refcoco_unc_ref5"]["json"])
    assert meta["sentences"] == ["Ref 5 raw"] and (meta["ref_id"], meta["ann_id"], meta["image_id"]) == (5, 100, 9)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_refs_pickle_with_a_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Exploit()}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing posix.system"):
        load_refs(str(path))
    assert not (tmp_path / "PWNED").exists()


# --- resume ---------------------------------------------------------------------------------------

def _payload(index: int, crash_at: int | None = None) -> dict[str, bytes]:
    if index == crash_at:
        raise KeyboardInterrupt  # the conversion is killed while writing this sample
    return {"txt.png": encode_png(np.full((4, 4), index, np.uint8))}


def _items(crash_at=None):
    return [SourceItem(f"s{i:03d}", functools.partial(_payload, i, crash_at), 100, f"src/{i}") for i in range(10)]


def test_resume_after_a_killed_conversion(tmp_path):
    clean = write_shards(_items(), str(tmp_path / "clean"), "x", max_count=3)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        write_shards(_items(crash_at=7), out, "x", max_count=3)
    assert sorted(os.listdir(out)) == ["x-000000.tar", "x-000001.tar", "x.manifest.json"]  # no half shard
    (tmp_path / "killed" / "x-000002.tar.tmp-0123456789ab").write_bytes(b"half")  # what a SIGKILL leaves
    assert _manifest(out, "x")["complete"] is False  # an interrupted conversion never looks complete
    with pytest.raises(DataError, match="x.manifest.json: incomplete conversion.*was interrupted"):
        shard_counts(expand_urls(out))
    first = os.stat(os.path.join(out, "x-000000.tar"))
    resumed = write_shards(_items(), out, "x", max_count=3)
    assert resumed["shards"] == clean["shards"] and resumed["complete"] is True  # same names, counts and sha256
    assert sorted(os.listdir(out)) == ["x-000000.tar", "x-000001.tar", "x-000002.tar", "x-000003.tar", "x.manifest.json"]
    assert os.stat(os.path.join(out, "x-000000.tar")).st_mtime_ns == first.st_mtime_ns  # skipped, not rewritten
    with pytest.raises(ConversionError, match="other options"):
        write_shards(_items(), out, "x", max_count=4)
    assert _manifest(out, "x") == resumed  # refused before writing: the complete set stays as it was


def test_a_completed_shard_in_another_order_is_stale(tmp_path):
    items = _items()
    assert writer.shuffled(items, None) == items
    assert sorted(writer.shuffled(items, 0), key=lambda item: item.key) == items
    assert [i.key for i in writer.shuffled(items, 0)] != [i.key for i in writer.shuffled(items, 1)]
    write_shards(items, str(tmp_path), "x")  # one shard: the same keys whatever the order
    with pytest.raises(ConversionError, match="in another order.*other options"):
        write_shards(writer.shuffled(items, 0), str(tmp_path), "x")


def test_parallel_writers_give_the_same_shards(tmp_path):
    from vpd_ray.data.synth import synth_items

    one = write_shards(synth_items("seg", 6, 0), str(tmp_path / "a"), "s", max_count=2, workers=1)
    two = write_shards(synth_items("seg", 6, 0), str(tmp_path / "b"), "s", max_count=2, workers=2)
    assert one["shards"] == two["shards"]


def test_size_bounds_and_duplicate_keys():
    items = [SourceItem(f"k{i}", dict, 40, "") for i in range(5)]
    assert [len(g) for g in writer.plan_shards(items, max_count=10, max_bytes=100)] == [2, 2, 1]
    assert [len(g) for g in writer.plan_shards(items, max_count=3, max_bytes=10**6)] == [3, 2]
    with pytest.raises(ConversionError, match="same key 'k0'"):
        write_shards(items + items[:1], "/nonexistent", "x")
