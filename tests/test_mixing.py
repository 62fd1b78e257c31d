"""Batches mix scenes like the reference's whole-split shuffle: NYU frames listed scene by scene,
converted by the CLI, streamed by the real train pipeline over 2 ranks x 3 loader workers.

Each loader slot reads one contiguous range of the concatenated shards, so a conversion in list
order feeds every batch from one or two scenes; the seeded shuffled write (the train default)
brings the mean number of distinct scenes per batch to what a globally shuffled loader gives.
"""

from __future__ import annotations

import math
import statistics

import pytest
from test_shards import write_nyu_tree
from vpd_ray import shards as cli
from vpd_ray.data.pipeline import build_stream

SCENES = ["bathroom", "bedroom", "bookstore", "classroom", "dining_room", "kitchen", "living_room", "office"]
FRAMES = 40
BATCH = 3
RANKS, WORKERS = 2, 3
EPOCHS = 2


def _scene(sample, rng):
    return {"scene": sample["meta"]["scene"]}


def global_shuffle_expectation(scene_sizes: list[int], batch: int) -> float:
    """Mean distinct scenes in a batch drawn without replacement from the whole split: the sum over
    scenes of the chance that at least one of its frames is drawn."""
    total = sum(scene_sizes)
    return sum(1 - math.comb(total - n, batch) / math.comb(total, batch) for n in scene_sizes)


def distinct_scenes_per_batch(urls: str) -> float:
    """Mean distinct scenes over ``EPOCHS`` epochs of every rank's batches."""
    counts = []
    for rank in range(RANKS):
        stream = build_stream(urls, _scene, train=True, batch_size=BATCH, seed=0, fields=("json",),
                              num_workers=WORKERS, rank=rank, world_size=RANKS)
        batches = iter(stream)
        counts += [len(set(next(batches)["scene"])) for _ in range(EPOCHS * stream.steps_per_epoch)]
    return statistics.mean(counts)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on a 2-core machine
def test_shuffled_train_shards_mix_scenes_like_a_global_shuffle(tmp_path):
    root = tmp_path / "nyu"
    write_nyu_tree(root, {"train": [f"{scene}_{i:04d}" for i, scene in enumerate(SCENES)]}, range(FRAMES))
    measured = {}
    for name, options in (("shuffled", []), ("list order", ["--no-shuffle"])):
        out = str(tmp_path / name.replace(" ", "_"))
        # 2 shards of 160 for 6 slots of ~53 samples: each slot's range lies inside one shard, as at scale
        assert cli.main(["nyu", "--root", str(root), "--split", "train", "--out", out, "--max-count", "160",
                         *options]) == 0
        measured[name] = distinct_scenes_per_batch(out)
    expected = global_shuffle_expectation([FRAMES] * len(SCENES), BATCH)
    print(f"distinct scenes per batch of {BATCH}: {measured}, global shuffle {expected:.3f}")
    assert measured["shuffled"] >= 0.9 * expected
    assert measured["list order"] <= 0.7 * expected
