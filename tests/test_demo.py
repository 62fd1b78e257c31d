"""``python -m vpd_ray.demo``: predictions and raw files in process, the server through gradio_client,
and the page in a headless Chromium (Selenium).

Packages are the sample configs' tiny random-weight models (no training): what is checked is the
plumbing (upload -> model -> picture, readout and raw file; bad inputs -> one message), not accuracy.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def export_tiny_package(out_dir, config: str | None = None, base: dict | None = None) -> str:
    """A model package of a config's tiny random-weight model (the path of a YAML file, or a dict)."""
    from vpd_ray.config import compose, to_yaml
    from vpd_ray.modeling import architecture, build_model
    from vpd_ray.package import export_package

    cfg = compose(config, base=base)
    torch.manual_seed(0)
    model = build_model(cfg)
    return export_package(model.state_dict(), to_yaml(cfg), architecture(model), str(out_dir))


def depth_and_refer_config() -> dict:
    """sample.yaml with sample_refer.yaml's refer task: one package, the task picker and the sentence box."""
    from omegaconf import OmegaConf

    depth, refer = (OmegaConf.load(os.path.join(CONFIGS, name)) for name in ("sample.yaml", "sample_refer.yaml"))
    depth.tasks.refer = refer.tasks.refer
    return OmegaConf.to_container(depth)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A real photograph, a text file with an image suffix, a text file, and a photo too wide."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.coffee()[::2, ::2]).save(root / "coffee.jpg")  # 200x300
    (root / "notes.png").write_text("not an image")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8193, 2)).save(root / "wide.png")
    return root


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    return {
        "depth": export_tiny_package(root / "depth", os.path.join(CONFIGS, "sample.yaml")),
        "seg": export_tiny_package(root / "seg", os.path.join(CONFIGS, "sample_seg.yaml")),
        "refer": export_tiny_package(root / "refer", os.path.join(CONFIGS, "sample_refer.yaml")),
        "depth+refer": export_tiny_package(root / "depth_refer", base=depth_and_refer_config()),
    }


# --- in process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["depth", "seg", "refer"])
def test_run_gives_a_picture_a_readout_and_the_raw_output(task, packages, photos):
    from vpd_ray.demo import Demo, predict

    demo = Demo(packages[task])
    picture, readout, raw = demo.run(task, str(photos / "coffee.jpg"), "the red circle")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 10
    image = np.asarray(Image.open(photos / "coffee.jpg").convert("RGB"))
    want = predict(demo.model, task, image, "the red circle", demo.max_side, demo.device)
    saved = Image.open(raw)
    back = np.asarray(saved)
    assert back.shape == image.shape[:2]  # the photo's size
    if task == "depth":
        assert raw.endswith("_depth_mm.png") and back.dtype == np.uint16
        np.testing.assert_array_equal(back, np.rint(want * 1000).astype(np.uint16))
        assert "median" in readout and " m" in readout
    else:
        assert saved.mode == "P"
        np.testing.assert_array_equal(back, want)
        assert ("classes present" if task == "seg" else "Mask:") in readout


def test_large_photos_are_downscaled_for_the_model_only(packages, photos):
    from vpd_ray.demo import Demo, model_size

    image = np.zeros((300, 200, 3), dtype=np.uint8)
    assert model_size(image, 100).shape == (100, 67, 3) and model_size(image, None) is image
    demo = Demo(packages["seg"], max_side=64)
    _, _, raw = demo.run("seg", str(photos / "coffee.jpg"), None)
    assert np.asarray(Image.open(raw)).shape == (200, 300)


def test_bad_inputs_are_one_line(packages, photos, monkeypatch):
    from vpd_ray import demo as demo_module
    from vpd_ray.demo import Demo

    demo = Demo(packages["refer"])
    cases = {
        str(photos / "notes.png"): "notes.png is not an image",
        str(photos / "wide.png"): "wide.png is 8193x2 px; the demo takes at most 8192 px a side",
        None: "Upload a photo first",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            demo.run("refer", path, "the red circle")
    with pytest.raises(ValueError, match="the sentence is empty"):
        demo.run("refer", str(photos / "coffee.jpg"), "   ")
    with pytest.raises(ValueError, match="not in this package"):
        demo.run("depth", str(photos / "coffee.jpg"), None)
    monkeypatch.setattr(demo_module, "MAX_MEGAPIXELS", 0.05)  # the photo has 0.06
    with pytest.raises(ValueError, match="coffee.jpg is 300x200 px; .* and 0.05 megapixels"):
        demo.run("refer", str(photos / "coffee.jpg"), "the red circle")


def test_cli_refuses_a_folder_that_is_no_package(tmp_path, capsys):
    from vpd_ray.demo import main

    assert main([str(tmp_path)]) == 2
    assert "is not a model package" in capsys.readouterr().err


# --- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(packages, tmp_path_factory):
    """``python -m vpd_ray.demo`` on the depth+refer package, on a free 127.0.0.1 port; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vpd_ray.demo", packages["depth+refer"], "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited ({proc.returncode}):\n{log.read_text()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=2).close()
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer within 90 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # a server subprocess: ~12 s
def test_server_predicts_and_explains_bad_inputs(server, photos):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    picture, readout, raw = client.predict("depth", handle_file(str(photos / "coffee.jpg")), "", "the model's range",
                                           api_name="/predict")
    shown = np.asarray(Image.open(picture))
    assert shown.ndim == 3 and shown.std() > 10
    assert "colour scale 0.00–10.00 m" in readout
    depth = np.asarray(Image.open(raw))
    assert depth.dtype == np.uint16 and depth.shape == (200, 300) and (depth > 0).all()  # millimetres

    _, readout, raw = client.predict("refer", handle_file(str(photos / "coffee.jpg")), "the red circle",
                                     "this photo's range", api_name="/predict")
    assert "the red circle" in readout and set(np.unique(np.asarray(Image.open(raw)))) <= {0, 1}

    bad = [("refer", "coffee.jpg", " ", "the sentence is empty"),
           ("depth", "notes.png", "", "notes.png is not an image"),
           ("depth", "wide.png", "", "at most 8192 px a side"),
           ("depth", "notes.txt", "", "Invalid file type")]  # Gradio's own check of the upload's type
    for task, name, sentence, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(task, handle_file(str(photos / name)), sentence, "this photo's range", api_name="/predict")


# --- the page in a browser ----------------------------------------------------------------------
def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser(width: int = 1400, height: int = 1000):
    """Headless Chromium from the system packages (no driver download: Selenium Manager stays offline)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def predict_in_page(browser, url: str, photo: str, timeout: float = 60) -> bytes:
    """Open the page, upload ``photo``, press Predict, wait for the result; the result image as PNG bytes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, timeout)
    browser.get(url)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]"))).send_keys(photo)
    stem = os.path.splitext(os.path.basename(photo))[0]
    wait.until(ec.text_to_be_present_in_element((By.ID, "photo"), stem))  # uploaded: its name is listed
    browser.find_element(By.ID, "predict").click()
    result = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#result img")))
    wait.until(lambda _: browser.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0",
                                                result))
    wait.until(ec.text_to_be_present_in_element((By.ID, "readout"), "median"))
    return result.screenshot_as_png


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs chromium and chromedriver (apt-get install chromium "
                                                  "chromium-driver; .ci/run installs them)")
def test_page_shows_a_result_in_a_real_browser(server, photos, tmp_path):
    browser = open_browser()
    try:
        result = predict_in_page(browser, server, str(photos / "coffee.jpg"))
        page = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
        text = browser.find_element("tag name", "body").text
    finally:
        browser.quit()
    shown = np.asarray(Image.open(io.BytesIO(result)).convert("RGB"))
    assert shown.shape[0] > 100 and shown.std() > 20, "the result image is blank"
    assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 100  # a photo and a colour bar, not a flat fill
    assert page.std() > 20
    assert "running on cpu" in text or "running on cuda" in text  # the page states its device
