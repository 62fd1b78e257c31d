"""build_stream: exactly-once splits across ranks and loader workers, resume, corrupt and forbidden
fields, URL forms; and the NYU depth augmentation."""

from __future__ import annotations

import collections
import functools
import io
import itertools
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

from vpd_ray.data import pipeline
from vpd_ray.data.augment import color
from vpd_ray.data.augment import depth as aug
from vpd_ray.data.decode import CorruptSampleError, ForbiddenFieldError, decode_sample
from vpd_ray.data.pipeline import DataPosition, build_stream, plan_epoch
from vpd_ray.data.tario import expand_urls
from vpd_ray.errors import DataError
from vpd_ray.data.writer import SourceItem, encode_jpeg, write_shards

COUNTS = (7, 3, 5, 4, 6)  # five uneven shards, 25 samples


def _fields(index: int) -> dict[str, bytes]:
    image = np.full((8, 8, 3), index * 9 % 256, np.uint8)
    return {"jpg": encode_jpeg(image), "json": json.dumps({"i": index}).encode()}


def _write(out: str, counts=COUNTS, prefix: str = "t") -> list[str]:
    """Shards of ``counts`` samples each (one shard per count), returned as paths."""
    paths = []
    start = 0
    for s, count in enumerate(counts):
        items = [SourceItem(f"k{i:04d}", functools.partial(_fields, i), 10, f"src/{i}") for i in range(start, start + count)]
        write_shards(items, out, f"{prefix}{s}", max_count=1000)
        paths.append(os.path.join(out, f"{prefix}{s}-000000.tar"))
        start += count
    return paths


def _meta_transform(sample, rng=None):
    return {"i": torch.tensor(sample["meta"]["i"])}


def _take(stream, batches: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(batches)]


def _seen(batches: list[dict]) -> list[tuple[str, int]]:
    return [(k, int(e)) for b in batches for k, e in zip(b["__key__"], b["__epoch__"])]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return _write(str(tmp_path_factory.mktemp("uneven")))


def test_plan_epoch_covers_every_sample_once_in_near_equal_ranges():
    plans = plan_epoch(list(COUNTS), 4, [4, 0, 3, 1, 2])
    sizes = [sum(take for _, _, take in plan) for plan in plans]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(COUNTS)
    covered = collections.Counter((shard, skip + j) for plan in plans for shard, skip, take in plan for j in range(take))
    assert set(covered.values()) == {1} and len(covered) == sum(COUNTS)


def test_train_exactly_once_per_epoch_two_ranks_two_workers(shards):
    streams = [build_stream(",".join(shards), _meta_transform, train=True, batch_size=2, seed=3, fields=("jpg", "json"),
                            num_workers=2, shuffle_buffer=4, rank=r, world_size=2) for r in range(2)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch == 25 // 4
    seen = [_seen(_take(s, 20)) for s in streams]
    everything = {f"k{i:04d}" for i in range(sum(COUNTS))}
    for epoch in (0, 1):
        keys = [k for rank in seen for k, e in rank if e == epoch]
        assert collections.Counter(keys) == collections.Counter(everything), f"epoch {epoch}"
    order = [[k for k, e in seen[0] if e == epoch] for epoch in (0, 1)]
    assert order[0] != order[1], "epoch 1 was not reshuffled"
    assert all(len(b["__key__"]) == 2 for s in streams for b in _take(s, 3))


def test_eval_every_sample_once_nothing_dropped(shards):
    keys = []
    for rank in range(2):
        stream = build_stream(shards, _meta_transform, train=False, batch_size=3, fields=("jpg", "json"),
                              num_workers=2, rank=rank, world_size=2)
        keys += [k for batch in stream for k in batch["__key__"]]
    assert sorted(keys) == sorted(f"k{i:04d}" for i in range(sum(COUNTS)))


def _union(positions):
    """The ranks' positions merged, as the trainer's checkpoint does (an elementwise max of the dense form)."""
    lo, hi = min(p.floor for p in positions), max(p.last for p in positions)
    return DataPosition.from_dense(lo, np.maximum.reduce([p.dense(lo, hi) for p in positions]))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (1, 2), (3, 0)], ids=["same", "fewer", "more"])
def test_resume_mid_epoch_sees_every_sample_of_the_epoch_once(shards, world_size, num_workers):
    """A 2-rank x 2-worker run stopped mid-epoch (what its loaders had prefetched is lost), resumed from
    the checkpointed position on the same, a smaller and a larger worker count: across the two parts
    every sample of epoch 0 is trained on exactly once."""
    def streams(ranks, workers, position):
        return [build_stream(",".join(shards), _meta_transform, train=True, batch_size=2, seed=3, fields=("jpg", "json"),
                             num_workers=workers, shuffle_buffer=4, rank=r, world_size=ranks, position=position)
                for r in range(ranks)]  # fmt: skip

    first = streams(2, 2, None)
    before = [pair for s in first for pair in _seen(_take(s, 3))]  # 12 of epoch 0's 25 samples
    saved = json.loads(json.dumps(_union([s.position for s in first]).to_dict()))  # through meta.json
    assert saved["floor"] == 0 and sum(e == 0 for _, e in before) == 12
    resumed = streams(world_size, num_workers, saved)
    after = [pair for s in resumed for pair in _seen(_take(s, 24 // world_size))]
    epoch0 = collections.Counter(k for k, e in before + after if e == 0)
    assert epoch0 == collections.Counter(f"k{i:04d}" for i in range(sum(COUNTS)))  # each once, none missing
    assert _union([s.position for s in resumed]).floor >= 1


def test_a_position_over_other_shards_is_refused(shards):
    saved = DataPosition(sum(COUNTS) + 1).to_dict()
    with pytest.raises(DataError, match="the shards changed since it was saved"):
        build_stream(shards, _meta_transform, train=True, batch_size=5, num_workers=0, rank=0, world_size=1,
                     position=saved)


def test_fewer_samples_than_workers_is_a_clear_error(tmp_path):
    paths = _write(str(tmp_path), counts=(3,))
    with pytest.raises(ValueError, match="cannot feed 2 rank"):
        build_stream(paths, _meta_transform, train=True, batch_size=1, num_workers=2, rank=0, world_size=2)


def _raw_shard(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_is_skipped_and_counted_then_fails_past_limit(tmp_path, caplog):
    good = _fields(1)
    path = str(tmp_path / "c-000000.tar")
    _raw_shard(path, [("a.jpg", good["jpg"]), ("a.json", good["json"]), ("b.jpg", b"not a jpeg"),
                      ("b.json", good["json"]), ("c.jpg", good["jpg"]), ("c.json", good["json"])])
    stream = build_stream(path, _meta_transform, train=False, batch_size=None, num_workers=0, rank=0, world_size=1)
    assert [s["__key__"] for s in stream] == ["a", "c"]
    assert "c-000000.tar" in caplog.text and "key b" in caplog.text
    strict = build_stream(path, _meta_transform, train=False, batch_size=None, max_corrupt=0, num_workers=0,
                          rank=0, world_size=1)
    with pytest.raises(DataError, match=r"more than data.max_corrupt=0.*c-000000\.tar"):
        list(strict)


def test_truncated_shard_keeps_complete_samples_and_moves_on(tmp_path, caplog):
    paths = _write(str(tmp_path), counts=(6, 2))
    with open(paths[0], "r+b") as f:
        f.truncate(os.path.getsize(paths[0]) // 2)
    stream = build_stream(paths, _meta_transform, train=False, batch_size=None, num_workers=0, rank=0, world_size=1)
    keys = [s["__key__"] for s in stream]
    assert 0 < keys.index("k0006") and keys[-2:] == ["k0006", "k0007"] and len(keys) < 8
    assert "truncated" in caplog.text or "tar ends" in caplog.text


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_field_is_rejected_never_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _fields(1)
    path = str(tmp_path / "p-000000.tar")
    _raw_shard(path, [("a.jpg", good["jpg"]), ("a.pkl", pickle.dumps(_Exploit())), ("a.json", good["json"])])
    stream = build_stream(path, _meta_transform, train=False, batch_size=None, num_workers=0, rank=0, world_size=1)
    with pytest.raises(ForbiddenFieldError, match=r"p-000000\.tar, key a: field\(s\) \['pkl'\]"):
        list(stream)
    assert not (tmp_path / "PWNED").exists()


def test_url_forms(shards, tmp_path):
    folder = os.path.dirname(shards[0])
    brace = os.path.join(folder, "t{0..4}-000000.tar")
    assert expand_urls(brace) == shards
    assert expand_urls(",".join(shards)) == shards
    assert expand_urls(folder) == sorted(shards)
    assert expand_urls(["file://" + shards[0]]) == ["file://" + shards[0]]


def test_rank_defaults_and_validation():
    assert pipeline.resolve_rank(None, None) == (0, 1)
    with pytest.raises(ValueError, match="outside world_size"):
        pipeline.resolve_rank(2, 2)


# --- NYU depth augmentation -----------------------------------------------------------------------

def _ramp(h=48, w=64):
    depth = np.tile(np.linspace(0.5, 9.5, w, dtype=np.float32), (h, 1))
    image = (depth / 10 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    return image, depth


def test_train_augment_shapes_and_geometry_match(monkeypatch):
    monkeypatch.setattr(aug, "PHOTOMETRIC_P", 0.0)
    monkeypatch.setattr(aug, "CUTDEPTH_P", 0.0)
    image, depth = _ramp()
    flips = 0
    for seed in range(20):
        img_t, depth_t, params = aug.train_augment(image, depth, np.random.default_rng(seed), crop_hw=(32, 40))
        assert img_t.shape == (3, 32, 40) and depth_t.shape == (1, 32, 40)
        assert img_t.dtype == torch.uint8 and depth_t.dtype == torch.float32  # photometric steps: on the device
        assert params.shape == (9,) and not params.any()  # every photometric step off
        expected = torch.from_numpy((depth_t[0].numpy() / 10 * 255).astype(np.uint8))
        assert torch.equal(img_t[0], expected)  # image and depth were flipped and cropped together
        flips += bool(depth_t[0, 0, 0] > depth_t[0, 0, -1])
    assert 0 < flips < 20


def test_cut_depth_writes_truncated_metres_into_a_strip():
    image, depth = _ramp()
    out = aug.cut_depth(image, depth, np.random.default_rng(0))
    changed = np.where((out != image).any(axis=(0, 2)))[0]
    assert len(changed) > 0 and np.all(np.diff(changed) == 1)
    assert np.array_equal(out[:, changed, 0], depth[:, changed].astype(np.uint8))


def test_cut_depth_on_a_quarter_of_samples(monkeypatch):
    monkeypatch.setattr(aug, "PHOTOMETRIC_P", 0.0)
    image, depth = _ramp(8, 16)  # image values >= 12; a CutDepth strip holds 0..9
    cut = sum(bool(aug.train_augment(image, depth, np.random.default_rng(s), (8, 16))[0].min() < 10)
              for s in range(200))
    assert 30 <= cut <= 70


def test_hsv_round_trip_and_eval_prepare():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)).float()
    back = color.hsv8_to_rgb(color.rgb_to_hsv8(image))
    assert (back - image).abs().max() <= 4  # 2-degree hue steps, as in OpenCV's 8-bit HSV
    img_t, depth_t = aug.eval_prepare(*_ramp())
    assert img_t.shape == (3, 48, 64) and depth_t.shape == (1, 48, 64)
    assert img_t.dtype == torch.float32 and img_t.max() <= 1  # evaluation has no device step


@pytest.mark.parametrize("subsampling, progressive", [(0, False), (2, False), (2, True)])
def test_shard_jpegs_decode_as_pillow_decodes_them(subsampling, progressive):
    """The fast JPEG decoder of shard samples gives Pillow's pixels; a truncated file is corrupt."""
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    data = buf.getvalue()
    sample = decode_sample({"jpg": data}, "k", "x.tar", {"jpg"})
    assert np.array_equal(sample["image"], np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    with pytest.raises(CorruptSampleError, match="key k, field jpg"):
        decode_sample({"jpg": data[: len(data) // 2]}, "k", "x.tar", {"jpg"})


def test_fsspec_url_without_manifest_is_counted_and_read(shards):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shards[:2]:
        fs.pipe(f"/vpd_ray_test/{os.path.basename(path)}", open(path, "rb").read())
    url = "memory://vpd_ray_test/t{0..1}-000000.tar"  # no manifest there: counts come from a header scan
    stream = build_stream(url, _meta_transform, train=False, batch_size=4, num_workers=0, rank=0, world_size=1)
    assert [k for batch in stream for k in batch["__key__"]] == [f"k{i:04d}" for i in range(COUNTS[0] + COUNTS[1])]


def _ray_train_worker(config: dict) -> None:
    import ray.train

    stream = build_stream(config["urls"], _meta_transform, train=False, batch_size=2, num_workers=0)
    rank = ray.train.get_context().get_world_rank()
    keys = [k for batch in stream for k in batch["__key__"]]
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": stream.dataset.rank, "world_size": stream.dataset.world_size, "keys": keys}, f)


@pytest.mark.slow
def test_rank_and_world_size_come_from_ray_train(ray_cluster, shards, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    TorchTrainer(_ray_train_worker, train_loop_config={"urls": shards, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ranks")).fit()
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    assert sorted(results[0]["keys"] + results[1]["keys"]) == [f"k{i:04d}" for i in range(sum(COUNTS))]


def _epochs(size: int, reads: list[int] | None = None, count: int = 10, start: int = 0):
    """``shuffle_epochs``' input from epoch ``start``: ``count`` samples ``(epoch, i)`` an epoch, the order
    drawn from ``default_rng(epoch)``; ``reads`` logs the epoch of each sample read."""
    def samples(epoch):
        for i in range(count):
            if reads is not None:
                reads.append(epoch)
            yield epoch, i
    return ((epoch, np.random.default_rng(epoch), samples(epoch), size) for epoch in itertools.count(start))


def test_shuffle_buffer_of_zero_or_one_keeps_the_order():
    from vpd_ray.data.pipeline import shuffle_epochs

    for size in (0, 1):
        out = [sample for _, _, sample in itertools.islice(shuffle_epochs(_epochs(size, count=5)), 10)]
        assert out == [(e, i) for e in (0, 1) for i in range(5)]


def test_shuffle_epochs_fills_the_next_buffer_while_emptying_this_one():
    """Each epoch comes out whole and in the order it has when shuffled alone (what a resume replays),
    and past the first buffer no sample waits for more than one read: no burst at the boundary."""
    from vpd_ray.data.pipeline import shuffle_epochs

    reads: list[int] = []
    read_before, out = [], []
    for epoch, _, sample in itertools.islice(shuffle_epochs(_epochs(4, reads)), 30):
        read_before.append(len(reads))
        out.append(sample)
        assert sample[0] == epoch  # with its own epoch's number and rng
    assert [sorted(out[e * 10:(e + 1) * 10]) for e in range(3)] == [[(e, i) for i in range(10)] for e in range(3)]
    alone = [s for e in (0, 1, 2) for _, _, s in itertools.islice(shuffle_epochs(_epochs(4, start=e)), 10)]
    assert out == alone
    assert read_before[0] == 5 and np.diff(read_before).max() <= 1  # the first buffer (4) + 1, then at most one each


def _big_shard(path: str, count: int, size: int) -> None:
    """A shard of ``count`` samples with one ``size``-byte member each."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"s{i:04d}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes([i]) * size))


class _CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        _CountingFile.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        _CountingFile.read_bytes += n or 0
        return n


def test_a_slot_starting_deep_in_a_shard_seeks_past_the_others_samples(tmp_path, monkeypatch):
    from vpd_ray.data import tario

    path, size = str(tmp_path / "big.tar"), 1 << 16
    _big_shard(path, 20, size)
    monkeypatch.setattr(tario, "open_url", lambda url: _CountingFile(url, "rb"))
    everything = dict(tario.iter_raw_samples(path))
    assert _CountingFile.read_bytes >= 20 * size  # every sample read
    _CountingFile.read_bytes = 0
    tail = list(tario.iter_raw_samples(path, skip=18, take=2))
    assert [key for key, _ in tail] == ["s0018", "s0019"] and all(fields == everything[k] for k, fields in tail)
    assert _CountingFile.read_bytes < 4 * size  # the two samples and headers, not the 18 before them
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - size // 2)
    with pytest.raises(tario.TruncatedShardError):
        list(tario.iter_raw_samples(path, skip=18, take=2))
