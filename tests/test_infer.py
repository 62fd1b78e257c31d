"""Batch inference: input resolution, output writers, and the Ray Data path end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
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


# --- the model path -----------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(REPO, "configs", "sample.yaml")


def export_tiny_package(out_dir, config=SAMPLE_CONFIG):
    """A model package of a sample config's tiny random-weight model (no training needed)."""
    from vpd_ray.config import compose, to_yaml
    from vpd_ray.modeling import architecture, build_model
    from vpd_ray.package import export_package

    cfg = compose(config)
    torch.manual_seed(0)
    model = build_model(cfg)
    return export_package(model.state_dict(), to_yaml(cfg), architecture(model), str(out_dir))


@pytest.fixture(scope="module")
def depth_package(tmp_path_factory):
    return export_tiny_package(tmp_path_factory.mktemp("depth_pkg"))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Three real photographs (scikit-image), two synthetic NYU-like frames from the sample shards,
    and one file that is not an image."""
    import tarfile

    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(root / "chelsea.jpg")
    Image.fromarray(data.coffee()).save(root / "coffee.png")
    (root / "nested").mkdir()
    Image.fromarray(data.astronaut()).save(root / "nested" / "astronaut.jpg")
    with tarfile.open(os.path.join(REPO, "shards", "sample", "depth-val-000000.tar")) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:2]
        for member in jpgs:
            (root / member.name).write_bytes(tar.extractfile(member).read())
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def reference_depth_mm(model, image_path):
    """The single-process answer: one forward of the loaded package with the mean class embedding."""
    pixels = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        depth = model("depth", {"image": pixels, "class_id": torch.tensor([-1])})[0, 0].numpy()
    return writers.depth_to_mm(depth)


@pytest.mark.slow
def test_ray_inference_matches_single_process_and_reruns_cheaply(ray_cluster, depth_package, photo_dir, tmp_path):
    from vpd_ray.inference.runner import REPORT_NAME, InferOptions, run_inference

    out = tmp_path / "out"
    opts = InferOptions(model=depth_package, input=str(photo_dir), output=str(out), max_side=None, preview=True,
                        batch_size=2)
    summary = run_inference(opts)
    assert (summary.images, summary.written, summary.failed) == (6, 5, 1)
    report = json.loads((out / REPORT_NAME).read_text())
    assert [f["input"] for f in report["failures"]] == [str(photo_dir / "broken.jpg")]

    from vpd_ray.package import load_package

    model, _ = load_package(depth_package)
    inputs = sorted(p for p in photo_dir.rglob("*") if p.is_file() and p.name != "broken.jpg")
    for image_path in inputs:
        name = os.path.splitext(os.path.relpath(image_path, photo_dir))[0]
        written = Image.open(out / f"{name}.png")
        assert written.mode == "I;16"
        got = np.asarray(written).astype(np.int64)
        want = reference_depth_mm(model, image_path).astype(np.int64)
        assert got.shape == want.shape == np.asarray(Image.open(image_path)).shape[:2]
        assert np.abs(got - want).max() <= 1  # rounding to whole millimetres
        preview = np.asarray(Image.open(out / "preview" / f"{name}.png"))
        assert preview.ndim == 3 and preview.std() > 10  # the task's picture: photo | depth with its colour bar

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(stamps) == 2 * 5  # outputs and previews
    again = run_inference(opts)
    assert (again.written, again.skipped, again.failed) == (0, 5, 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


@pytest.mark.slow
def test_ray_inference_reads_shards_through_the_whitelist(ray_cluster, depth_package, tmp_path):
    from vpd_ray.inference.runner import InferOptions, run_inference

    shard = os.path.join(REPO, "shards", "sample", "depth-val-000000.tar")
    summary = run_inference(InferOptions(model=depth_package, input=shard, output=str(tmp_path), batch_size=16,
                                         protocol=True))
    assert summary.failed == 0 and summary.written == summary.images == 64
    written = sorted(p.stem for p in tmp_path.glob("*.png"))
    assert written[0] == "synth_depth_s1_0000000" and len(written) == 64


# --- model outputs -> maps ----------------------------------------------------------------------
def test_to_map_regression_scores_and_labels():
    from vpd_ray.inference.predictor import to_map

    depth = to_map(torch.full((1, 4, 4), 2.5), (8, 6))
    assert depth.dtype == np.float32 and depth.shape == (8, 6) and np.allclose(depth, 2.5)
    scores = torch.zeros(3, 4, 4)
    scores[2, :, :2] = 1.0  # class 2 on the left half, class 0 elsewhere
    labels = to_map(scores, (4, 4))
    assert labels.dtype == np.uint8 and labels[:, :2].tolist() == [[2, 2]] * 4 and labels[:, 2:].max() == 0
    protocol_labels = to_map(torch.tensor([[[0, 1], [1, 0]]]), (4, 4))  # [S=1, h, w] integer ids
    assert protocol_labels.tolist()[0] == [0, 0, 1, 1]


def test_inference_batch_of_each_task():
    """Each task builds its own batch for unlabelled images: depth reads the scene class from the
    meta (-1, the mean class embedding, for photos), refer needs and tokenises a sentence."""
    from vpd_ray.tasks.depth import DepthConfig, DepthTask
    from vpd_ray.tasks.refer import ReferConfig, ReferTask
    from vpd_ray.tasks.seg import SegConfig, SegTask

    pixels = torch.zeros(2, 3, 8, 8)
    depth = DepthTask(DepthConfig()).inference_batch(pixels, [{"meta": {"class_id": 3}}, {"meta": {}}], protocol=False)
    assert depth["class_id"].tolist() == [3, -1]
    refer = ReferTask(ReferConfig(text_encoder="tiny", max_tokens=5))
    batch = refer.inference_batch(pixels, [{"sentence": "the red one"}, {"sentence": "blue"}], protocol=True)
    assert batch["input_ids"].shape == (2, 1, 5) and batch["sentence_valid"].all()
    assert refer.inference_batch(pixels, [{"sentence": "a"}, {"sentence": "b"}], protocol=False)["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError, match="JSONL"):
        refer.inference_batch(pixels, [{"sentence": None}, {"sentence": "b"}], protocol=False)
    assert set(SegTask(SegConfig()).inference_batch(pixels, [{}, {}], protocol=True)) == {"image"}


def test_row_meta_comes_from_the_shard_json():
    from vpd_ray.inference.predictor import row_meta

    assert row_meta({"json": b'{"scene": "kitchen", "class_id": 12}'})["class_id"] == 12
    assert row_meta({"bytes": b"..."}) == {}  # a photo from a folder
    with pytest.raises(ValueError, match="unreadable json"):
        row_meta({"json": b"{not json"})
    with pytest.raises(ValueError, match="not an object"):
        row_meta({"json": b"[1, 2]"})


def test_cli_rejects_a_task_the_package_lacks(depth_package, tmp_path, capsys):
    from vpd_ray.infer import main

    _save_rgb(tmp_path / "in" / "a.jpg")
    code = main(["--model", depth_package, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--task", "seg"])
    assert code == 2 and "the package holds tasks depth" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("config", ["sample_seg.yaml", "sample_refer.yaml"])
def test_predictor_writes_label_pngs_equal_to_the_model_argmax(config, tmp_path):
    """Segmentation and referring outputs (in process: the actor class without Ray)."""
    from vpd_ray.inference.predictor import Predictor
    from vpd_ray.package import load_package

    package = export_tiny_package(tmp_path / "pkg", os.path.join(REPO, "configs", config))
    image = _save_rgb(tmp_path / "in" / "a.jpg", h=64, w=96)
    jsonl = tmp_path / "in" / "refs.jsonl"
    jsonl.write_text(json.dumps({"image": "a.jpg", "sentence": "the red circle"}) + "\n")
    source = sources.resolve_input(str(jsonl if "refer" in config else tmp_path / "in"))
    rows = source.pairs or [{"path": p, "bytes": open(p, "rb").read()} for p in source.paths]
    batch = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}

    model, _ = load_package(package)
    task = next(iter(model.tasks))
    status = Predictor(package, str(tmp_path / "out"), task, root=source.root)(batch)
    assert list(status["status"]) == ["written"], status["error"]
    written = Image.open(tmp_path / "out" / f"{status['name'][0]}.png")
    assert written.mode == "P"

    pixels = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None].float() / 255
    inputs = {"image": pixels}
    if task == "refer":
        inputs["input_ids"] = model.tasks[task].tokenize(["the red circle"])
    with torch.inference_mode():
        want = model(task, inputs)[0].argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(written), want)


def test_bf16_inference_runs_the_model_under_autocast(tmp_path):
    """``--dtype bf16``: the forward runs under bf16 autocast and the map comes back fp32, close to fp32's
    (the tiny random model's depth is flat, so closeness here is weak: tests/test_speed.py measures bf16's
    error on the VAE)."""
    import torch

    from vpd_ray.inference.predictor import Predictor

    package = export_tiny_package(tmp_path / "pkg")
    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    fp32 = Predictor(package, str(tmp_path / "a"), "depth").predict([image])[0]
    predictor = Predictor(package, str(tmp_path / "b"), "depth", dtype="bf16")
    seen = []
    forward = predictor.model.forward
    predictor.model.forward = lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or forward(*a, **k)
    bf16 = predictor.predict([image])[0]
    assert seen == [True] and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert bf16.dtype == np.float32 and bf16.shape == (96, 128)
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
