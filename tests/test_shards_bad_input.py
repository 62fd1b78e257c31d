"""Bad NYU input to ``python -m vpd_ray.shards``: where ``--list`` is looked for, unusable trees and
corrupt files fail with one line and exit 1, and a failed conversion's shards are marked incomplete
in their manifest, which the stream and the pre-run check refuse."""

from __future__ import annotations

import json
import os

import pytest
from test_shards import write_nyu_tree
from vpd_ray import shards as cli
from vpd_ray.data.pipeline import build_stream
from vpd_ray.data.tario import expand_urls, incomplete_reason
from vpd_ray.errors import DataError

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "shards", "sample")
TRAIN_DIR = "kitchen_0001"
FRAMES = range(4)


@pytest.fixture()
def nyu_root(tmp_path, monkeypatch):
    """A four-frame train tree at ``tmp_path/nyu``, with the current folder elsewhere (``tmp_path/cwd``)."""
    root = tmp_path / "nyu"
    write_nyu_tree(root, {"train": [TRAIN_DIR]}, FRAMES)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return root


def _convert(root, out, *options) -> int:
    return cli.main(["nyu", "--root", str(root), "--split", "train", "--out", str(out), *options])


def _manifest(out) -> dict:
    return json.load(open(os.path.join(out, "nyu-train.manifest.json")))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _read_keys(out) -> list[str]:
    return [s["__key__"] for s in build_stream(str(out), lambda s: s, train=False, batch_size=None, num_workers=0)]


def test_list_relative_to_root(nyu_root, tmp_path):
    assert _convert(nyu_root, tmp_path / "a", "--list", "train_list.txt") == 0
    assert _manifest(tmp_path / "a")["num_samples"] == len(FRAMES)
    nested = tmp_path / "data"  # the reference's data folder: <root>/nyu_depth_v2/{sync,train_list.txt}
    os.rename(nyu_root, tmp_path / "nyu_depth_v2")
    nested.mkdir()
    os.rename(tmp_path / "nyu_depth_v2", nested / "nyu_depth_v2")
    assert _convert(nested, tmp_path / "b", "--list", "train_list.txt") == 0
    assert _manifest(tmp_path / "b")["shards"] == _manifest(tmp_path / "a")["shards"]


def test_list_relative_to_cwd_wins_over_root_and_absolute_is_as_is(nyu_root, tmp_path):
    first = (nyu_root / "train_list.txt").read_text().splitlines()[0]
    (tmp_path / "cwd" / "train_list.txt").write_text(first + "\n")  # same name as root's, one line
    assert _convert(nyu_root, tmp_path / "a", "--list", "train_list.txt") == 0
    assert _manifest(tmp_path / "a")["num_samples"] == 1
    assert _convert(nyu_root, tmp_path / "b", "--list", str(nyu_root / "train_list.txt")) == 0
    assert _manifest(tmp_path / "b")["num_samples"] == len(FRAMES)


def test_list_not_found_names_every_place_looked_at(nyu_root, tmp_path, capsys):
    assert _convert(nyu_root, tmp_path / "out", "--list", "nope.txt") == 1
    line = _one_error_line(capsys)
    for place in (tmp_path / "cwd" / "nope.txt", nyu_root / "nope.txt", nyu_root / "nyu_depth_v2" / "nope.txt"):
        assert str(place) in line
    assert "--list nope.txt not found" in line and "give it with --list" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, expected", [
    ("no list file", "list file train_list.txt (the default for --split train) not found; looked at"),
    ("empty list", "train_list.txt lists no samples"),
    ("malformed list", "train_list.txt:1: expected '<rgb> <depth>'"),
    ("all files missing", "4 of 4 sources (100.0%) are missing or unreadable"),
])
def test_unusable_tree_fails_with_one_line(nyu_root, tmp_path, capsys, case, expected):
    lists = nyu_root / "train_list.txt"
    if case == "no list file":
        lists.unlink()
    elif case == "empty list":
        lists.write_text("\n")
    elif case == "malformed list":
        lists.write_text("/kitchen_0001/rgb_00000.jpg\n")
    else:
        for name in os.listdir(nyu_root / "sync" / TRAIN_DIR):
            os.remove(nyu_root / "sync" / TRAIN_DIR / name)
    assert _convert(nyu_root, tmp_path / "out", "--max-missing", "1") == 1
    assert expected in _one_error_line(capsys)
    if case == "all files missing":  # shards were written: no sample in them, and marked so
        assert _manifest(tmp_path / "out")["complete"] is False
    else:  # nothing was written
        assert not (tmp_path / "out").exists()


def _corrupt_depth(root, frame: int) -> None:
    path = root / "sync" / TRAIN_DIR / f"sync_depth_{frame:05d}.png"
    path.write_bytes(path.read_bytes()[:60])  # cut inside the image data


def test_corrupt_depth_png_is_listed_and_fails_only_over_the_limit(nyu_root, tmp_path, capsys):
    _corrupt_depth(nyu_root, 2)
    key = f"sync__{TRAIN_DIR}__rgb_00002"
    assert _convert(nyu_root, tmp_path / "out") == 1  # 1 of 4 is over the default 1%
    assert "1 of 4 sources (25.0%)" in _one_error_line(capsys)
    over = _manifest(tmp_path / "out")
    assert over["complete"] is False and "more than max_missing=1.0%" in over["reason"]
    assert [m["key"] for m in over["missing"]] == [key]
    assert "sync_depth_00002.png: not a readable image" in over["missing"][0]["reason"]
    assert _convert(nyu_root, tmp_path / "out", "--max-missing", "0.25") == 0  # resumes, within the limit
    under = _manifest(tmp_path / "out")
    assert under["complete"] is True and "reason" not in under
    assert under["num_samples"] == 3 and [m["key"] for m in under["missing"]] == [key]
    assert sorted(_read_keys(tmp_path / "out")) == [f"sync__{TRAIN_DIR}__rgb_{f:05d}" for f in (0, 1, 3)]


def test_failed_conversion_is_refused_by_the_stream_and_the_pre_run_check(nyu_root, tmp_path, capsys):
    os.remove(nyu_root / "sync" / TRAIN_DIR / "rgb_00001.jpg")
    out = tmp_path / "out"
    assert _convert(nyu_root, out) == 1
    manifest = _manifest(out)
    assert manifest["complete"] is False and manifest["num_samples"] == 3  # shards there, and marked unusable
    urls = expand_urls(str(out))
    reason = incomplete_reason(urls)
    path = os.path.join(str(out), "nyu-train.manifest.json")
    assert reason.startswith(f"{path}: incomplete conversion") and manifest["reason"] in reason
    assert "\n" not in reason
    with pytest.raises(DataError) as caught:
        build_stream(str(out), lambda s: s, train=True, batch_size=1, num_workers=0)
    assert str(caught.value) == reason
    assert _convert(nyu_root, out, "--max-missing", "0.5") == 0
    assert incomplete_reason(urls) is None and len(_read_keys(out)) == 3


def test_manifests_without_the_key_count_as_complete():
    """The bundled sample manifests predate ``complete`` and are read as they are."""
    for split in ("train", "val"):
        manifest = json.load(open(os.path.join(SAMPLE, f"depth-{split}.manifest.json")))
        assert "complete" not in manifest
        assert incomplete_reason(expand_urls(os.path.join(SAMPLE, f"depth-{split}-{{000000..000000}}.tar"))) is None
