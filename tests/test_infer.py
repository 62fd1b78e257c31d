"""Batch inference: input resolution, output writers, and the Ray Data path end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from vpd_ray.inference import sources, writers


def _save_rgb(path, h=32, w=48, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# --- writers ------------------------------------------------------------------------------------
def test_depth_png_round_trips_millimetres(tmp_path):
    depth = np.array([[0.0, 1.2344], [9.9996, 80.0]], dtype=np.float32)
    writers.write_depth_png(tmp_path / "d.png", depth)
    back = np.asarray(Image.open(tmp_path / "d.png"))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, [[0, 1234], [10000, 65535]])  # clipped at 65.535 m


def test_label_png_keeps_indices_and_has_a_palette(tmp_path):
    label = np.arange(150, dtype=np.uint8).reshape(10, 15)
    writers.write_label_png(tmp_path / "l.png", label)
    image = Image.open(tmp_path / "l.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), label)
    palette = writers.index_palette()
    assert len({tuple(c) for c in palette[:150]}) == 150  # every class its own colour


def test_label_png_rejects_out_of_range_values(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        writers.write_label_png(tmp_path / "l.png", np.array([[0, 300]]))


def test_atomic_save_leaves_no_partial_file(tmp_path):
    class Broken:
        def save(self, path, format=None):
            open(path, "wb").write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        writers.atomic_save(Broken(), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


# --- sources ------------------------------------------------------------------------------------
def test_folder_names_mirror_relative_paths(tmp_path):
    _save_rgb(tmp_path / "in" / "a.jpg")
    _save_rgb(tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    src = sources.resolve_input(str(tmp_path / "in"))
    assert src.kind == "files"
    assert [sources.output_name(p, src.root) for p in src.paths] == ["a", os.path.join("sub", "b")]


def test_glob_root_is_the_folder_before_the_wildcard(tmp_path):
    _save_rgb(tmp_path / "in" / "x" / "a.jpg")
    src = sources.resolve_input(str(tmp_path / "in" / "**" / "*.jpg"))
    assert [sources.output_name(p, src.root) for p in src.paths] == [os.path.join("x", "a")]


def test_two_inputs_for_one_output_are_refused(tmp_path):
    _save_rgb(tmp_path / "a.jpg")
    _save_rgb(tmp_path / "a.png")
    with pytest.raises(ValueError, match="would both write a.png"):
        sources.resolve_input(str(tmp_path))


def test_missing_input_names_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        sources.resolve_input(str(tmp_path / "nothing-here"))


def test_pairs_jsonl_names_and_bad_lines(tmp_path):
    _save_rgb(tmp_path / "img" / "cat.jpg")
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_text(
        json.dumps({"image": "img/cat.jpg", "sentence": "the cat"}) + "\n"
        + json.dumps({"image": "img/cat.jpg", "sentence": "left ear", "id": "ear"}) + "\n"
    )
    src = sources.resolve_input(str(jsonl))
    assert [p["name"] for p in src.pairs] == [os.path.join("img", "cat") + "__0", os.path.join("img", "cat") + "__ear"]
    jsonl.write_text('{"image": "img/cat.jpg"}\n')
    with pytest.raises(ValueError, match=r"refs.jsonl:1"):
        sources.resolve_input(str(jsonl))


def test_drop_existing_skips_written_outputs(tmp_path):
    for name in ("a", "b"):
        _save_rgb(tmp_path / "in" / f"{name}.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"done")
    src, dropped = sources.drop_existing(sources.resolve_input(str(tmp_path / "in")), tmp_path / "out")
    assert dropped == 1 and [os.path.basename(p) for p in src.paths] == ["b.jpg"]
