"""Bad input to inference and image decoding fails fast and the same way everywhere: a refused
shard, a cut shard, a corrupt member, a file that is no model package, images that cannot be shown
as 8-bit RGB as stored, and output file modes. One test per row of README's "When something is
wrong"; the Predictor runs in process, the Ray Data path (``slow``) on the session's cluster."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_infer import export_tiny_package

from vpd_ray.data import decode
from vpd_ray.inference import writers
from vpd_ray.inference.runner import REPORT_NAME, Progress

MAX_CONSOLE_LINES = 3
RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((raylet|pid=\d+)")  # a line Ray's log monitor forwarded


# --- inputs -------------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _photo(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_shard(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _samples(count: int, corrupt: tuple[int, ...] = ()) -> list[tuple[str, bytes]]:
    """Members of ``count`` samples ``s0..`` (a JPEG and a json each); ``corrupt``: garbage JPEGs."""
    members = []
    for i in range(count):
        jpg = b"\xff\xd8 not a JPEG" if i in corrupt else _encode(Image.fromarray(_photo(seed=i)), "JPEG")
        members += [(f"s{i}.jpg", jpg), (f"s{i}.json", json.dumps({"i": i}).encode())]
    return members


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _console(capfd) -> tuple[list[str], str]:
    """(every non-empty console line, the job's one last word: its summary or error line)."""
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    last = [line for line in lines if line.startswith("infer: ") and " done, " not in line]  # not a progress line
    assert len(last) == 1, lines
    return lines, last[0]


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def depth_package(tmp_path_factory):
    return export_tiny_package(tmp_path_factory.mktemp("depth_pkg"))


# --- the Ray Data path --------------------------------------------------------------------------
def _infer(package, input_path, out, *extra) -> int:
    from vpd_ray.infer import main

    return main(["--model", package, "--input", str(input_path), "--output", str(out), "--batch-size", "2", *extra])


@pytest.mark.slow
def test_forbidden_field_refuses_the_shard_with_trainings_message(ray_cluster, depth_package, tmp_path, capfd,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    members = _samples(4)
    members.insert(5, ("s2.pyd", pickle.dumps(_Exploit())))  # after s0, s1 and s2.jpg: late in the shard
    shard = _write_shard(tmp_path / "bad-000000.tar", members)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"an output of an earlier run")
    before = _snapshot(out)
    capfd.readouterr()

    code = _infer(depth_package, shard, out)
    lines, last = _console(capfd)

    with pytest.raises(decode.ForbiddenFieldError) as training:  # what training says of this sample
        decode.decode_sample({"jpg": b"", "pyd": b""}, "s2", shard, {"jpg"})
    assert code == 2 and last == f"infer: {training.value}" and len(lines) <= MAX_CONSOLE_LINES, lines
    assert not (tmp_path / "PWNED").exists()
    after = _snapshot(out)
    assert json.loads(after.pop(REPORT_NAME))["stopped"] == str(training.value)
    assert after == before  # nothing of the shard written, the earlier output untouched


@pytest.mark.slow
def test_cut_shard_and_corrupt_member_are_failed_rows_and_the_rest_is_written(ray_cluster, depth_package, tmp_path,
                                                                              capfd):
    shard = _write_shard(tmp_path / "cut-000000.tar", _samples(6, corrupt=(1,)))
    with open(shard, "r+b") as f:  # cut inside s4.jpg: the samples s0..s3 are complete
        data = f.read()
        f.truncate(data.index(b"s4.json") - 700)
    out = tmp_path / "out"
    out.mkdir()
    (out / "s0.png").write_bytes(b"an output of an earlier run")
    capfd.readouterr()

    code = _infer(depth_package, shard, out)
    lines, last = _console(capfd)

    assert code == 1 and len(lines) <= MAX_CONSOLE_LINES, lines
    assert "2 written, 1 skipped" in last and "2 failed" in last and REPORT_NAME in last
    assert sorted(p.stem for p in out.glob("*.png")) == ["s0", "s2", "s3"]
    assert (out / "s0.png").read_bytes() == b"an output of an earlier run"
    report = json.loads((out / REPORT_NAME).read_text())
    failures = {f["input"]: f["error"] for f in report["failures"]}
    assert set(failures) == {f"{shard}#s1", shard} and report["stopped"] == ""
    assert "key s1, field jpg" in failures[f"{shard}#s1"]  # decode_sample's message, as in training
    assert "TruncatedShardError" in failures[shard] and shard in failures[shard]


@pytest.mark.slow
def test_max_failed_stops_the_job_with_one_line(ray_cluster, depth_package, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    for i in range(6):
        Image.fromarray(_photo(seed=i)).save(folder / f"b{i}.png")
    out = tmp_path / "out"
    capfd.readouterr()

    code = _infer(depth_package, folder, out, "--max-failed", "0")
    lines, last = _console(capfd)

    assert code == 1 and len(lines) <= MAX_CONSOLE_LINES, lines
    stop = f"1 failed, more than --max-failed 0; last: {folder / 'a_broken.jpg'}: "
    assert last.startswith(f"infer: stopped: {stop}")
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["stopped"].startswith(stop) and report["failed"] == 1


def test_progress_stops_once_more_than_max_failed_rows_failed():
    """The rule the job's loop breaks on, row by row (the Ray test cannot pin how far it got)."""
    def rows(*statuses):
        return {"source": [f"x{i}" for i in range(len(statuses))], "status": list(statuses),
                "error": ["bad"] * len(statuses)}

    progress = Progress(total=5, skipped=0, max_failed=1)
    progress.update(rows("written", "failed"))
    assert progress.stop == ""
    progress.update(rows("failed"))
    assert progress.stop == "2 failed, more than --max-failed 1; last: x0: bad"
    assert progress.summary().exit_code == 1 and progress.summary().stopped == progress.stop
    refused = Progress(total=0, skipped=0)
    refused.update(rows("written", "refused"))
    assert refused.stop == "bad" and refused.summary().exit_code == 0  # refusals exit 2 on their own path


def test_incomplete_conversion_is_refused_before_ray_starts(depth_package, tmp_path, capfd):
    shard = _write_shard(tmp_path / "half-000000.tar", _samples(2))
    manifest = tmp_path / "half.manifest.json"
    manifest.write_text(json.dumps({"complete": False, "reason": "3 unreadable sources", "shards": []}))
    capfd.readouterr()

    code = _infer(depth_package, shard, tmp_path / "out")
    lines, last = _console(capfd)
    # Ray's driver forwards the raylet's late warnings of an earlier test's job (its killed actors) to this
    # process's console at any time: not this command's lines
    lines = [line for line in lines if not RAY_FORWARDED.match(line)]

    assert code == 2 and lines == [last] and str(manifest) in last and "incomplete conversion" in last
    assert not (tmp_path / "out").exists()


# --- the package --------------------------------------------------------------------------------
def test_random_file_named_model_safetensors_is_one_line(depth_package, tmp_path, capfd):
    import shutil

    from vpd_ray.package import PackageError, load_package

    fake = tmp_path / "fake"
    shutil.copytree(depth_package, fake)
    (fake / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "in").mkdir()
    Image.fromarray(_photo()).save(tmp_path / "in" / "a.png")
    capfd.readouterr()

    code = _infer(str(fake), tmp_path / "in", tmp_path / "out")
    lines, last = _console(capfd)

    assert code == 2 and lines == [last], lines
    assert str(fake / "model.safetensors") in last and "not a safetensors file" in last
    assert not (tmp_path / "out").exists()
    with pytest.raises(PackageError, match="is not a vpd_ray package"):  # evaluate's and the demo's loader
        load_package(str(fake))


# --- images through the predictor (in process) --------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return tmp_path_factory.mktemp("photos")


@pytest.fixture(scope="module")
def predictor(depth_package, photos, tmp_path_factory):
    from vpd_ray.inference.predictor import Predictor

    return Predictor(depth_package, str(tmp_path_factory.mktemp("predicted")), "depth", root=str(photos),
                     max_side=1024)


def _predict(predictor, path, monkeypatch) -> tuple[dict, list[np.ndarray], int]:
    """One file through the predictor as Ray's read hands it over: (its status row, the uint8 images
    the model got, the exit code of a job of this one file)."""
    seen = []
    forward = predictor._forward

    def spy(images, inputs, sizes):
        seen.append(images.copy())
        return forward(images, inputs, sizes)

    monkeypatch.setattr(predictor, "_forward", spy)
    status = predictor({"bytes": np.array([path.read_bytes()], dtype=object), "path": np.array([str(path)], dtype=object)})
    progress = Progress(total=1, skipped=0, stream=io.StringIO())
    progress.update(status)
    return {key: str(column[0]) for key, column in status.items()}, seen, progress.summary().exit_code


def _written(predictor, name: str) -> Image.Image:
    return Image.open(predictor.output_dir / f"{name}.png")


@pytest.mark.parametrize("name, data, reason", [
    ("notes.jpg", b"meeting notes, not a photo", "cannot identify image file"),
    ("dot.png", _encode(Image.new("RGB", (1, 1))), "image is 1x1 px; the model needs at least 8 px a side"),
    ("float.tif", _encode(Image.new("F", (16, 16)), "TIFF"), "image mode F (32-bit float) has no fixed range"),
])
def test_unreadable_image_is_a_failed_row_naming_the_file(predictor, photos, monkeypatch, name, data, reason):
    path = photos / name
    path.write_bytes(data)
    row, seen, code = _predict(predictor, path, monkeypatch)
    assert (row["status"], row["source"], code, seen) == ("failed", str(path), 1, [])
    assert reason in row["error"] and "\n" not in row["error"]
    assert not (predictor.output_dir / f"{path.stem}.png").exists()


def test_16_bit_grayscale_png_is_scaled_not_clipped(predictor, photos, monkeypatch):
    gray16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = photos / "gray16.png"
    Image.fromarray(gray16).save(path)
    assert Image.open(path).mode == "I;16"
    row, seen, code = _predict(predictor, path, monkeypatch)
    assert (row["status"], code) == ("written", 0)
    faithful = np.rint(gray16 / 257).astype(np.uint8)  # 0..65535 onto 0..255
    np.testing.assert_array_equal(seen[0][0], np.repeat(faithful[..., None], 3, axis=2))
    assert (seen[0] == 255).mean() < 0.01  # PIL's own convert("RGB") makes 99.6% of this white


def test_6000x4000_jpeg_is_downscaled_for_the_model_and_written_at_its_size(predictor, photos, monkeypatch):
    path = photos / "large.jpg"
    Image.fromarray(np.kron(_photo(40, 60), np.ones((100, 100, 1), np.uint8))).save(path, quality=80)
    row, seen, code = _predict(predictor, path, monkeypatch)
    assert (row["status"], code) == ("written", 0)
    assert seen[0].shape == (1, 683, 1024, 3)  # --max-side 1024
    assert _written(predictor, "large").size == (6000, 4000)


def test_palette_png_is_looked_up(predictor, photos, monkeypatch):
    indices = np.arange(24 * 40, dtype=np.uint8).reshape(24, 40) % 16
    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette(palette.reshape(-1).tolist())
    path = photos / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    row, seen, _ = _predict(predictor, path, monkeypatch)
    assert row["status"] == "written"
    np.testing.assert_array_equal(seen[0][0], palette[indices])


def test_exif_rotated_jpeg_is_shown_upright_but_shard_samples_stay_as_stored(predictor, photos, monkeypatch):
    stored = _photo(24, 40)  # landscape pixels, EXIF orientation 6: the camera was turned, show it portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    path = photos / "turned.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    as_stored = np.asarray(Image.open(path).convert("RGB"))
    row, seen, _ = _predict(predictor, path, monkeypatch)
    assert row["status"] == "written"
    np.testing.assert_array_equal(seen[0][0], np.rot90(as_stored, k=-1))  # a quarter turn clockwise
    assert _written(predictor, "turned").size == (24, 40)
    # in a shard, labels are aligned with the stored pixels (COCO's masks ignore EXIF): no turn
    sample = decode.decode_sample({"jpg": path.read_bytes()}, "k", "x.tar", {"jpg"})
    np.testing.assert_array_equal(sample["image"], as_stored)


# --- decoding -----------------------------------------------------------------------------------
def test_8_bit_rgb_decodes_exactly_as_stored():
    """Every training shard image: the same array as before any of the conversions existed."""
    for fmt in ("PNG", "JPEG"):
        data = _encode(Image.fromarray(_photo()), fmt)
        np.testing.assert_array_equal(decode.decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("1", "PNG")])
def test_other_modes_take_pils_conversion(mode, fmt):
    data = _encode(Image.fromarray(_photo()).convert(mode), fmt)
    got = decode.decode_image(data)
    assert got.shape == (24, 40, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    rgba = np.dstack([_photo(), np.tile(np.array([0, 128, 255], np.uint8), (24, 14))[:, :40]])
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    got = decode.decode_image(_encode(image)).astype(int)
    colour = np.asarray(image.convert("RGBA"))[..., :3].astype(int)
    alpha = np.asarray(image.convert("RGBA"))[..., 3:].astype(int)
    assert (got[alpha[..., 0] == 0] == 255).all()  # fully transparent: white, not the stored colour
    np.testing.assert_array_equal(got[alpha[..., 0] == 255], colour[alpha[..., 0] == 255])
    half = alpha[..., 0] == 128
    assert np.abs(got[half] - (colour[half] * 128 + 255 * 127) / 255).max() <= 1


# --- output files -------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_outputs_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        writers.write_depth_png(tmp_path / "d.png", np.ones((8, 8), np.float32))
        writers.write_preview(tmp_path / "preview" / "p.png", np.ones((8, 8, 3), np.uint8))
        writers.write_label_png(tmp_path / "l.png", np.zeros((8, 8), np.uint8))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(["d.png", "p.png", "l.png", "plain"], 0o666 & ~umask)
