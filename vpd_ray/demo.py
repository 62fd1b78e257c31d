"""``python -m vpd_ray.demo PACKAGE [--port N] [--host H]``: try a model package on your own photo.

A Gradio page (served on 127.0.0.1 unless ``--host`` says otherwise) that loads the package once,
states the device it runs on, takes a photo (and a sentence for referring segmentation, a task for
a multitask package) and shows the task's picture from :mod:`vpd_ray.visualize` with a readout,
plus the raw output to download in the formats of ``python -m vpd_ray.infer``: depth as a 16-bit PNG
in millimetres, segmentation and referring masks as index PNGs.

The prediction is the one ``python -m vpd_ray.infer`` makes without ``--protocol``: the photo
downscaled to ``--max-side`` for one forward pass, the output resized back to the photo's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vpd_ray import visualize as vz

MAX_SIDE_PX = 8192  # a photo larger than this on a side is refused ...
MAX_MEGAPIXELS = 40  # ... and so is one of more megapixels: the demo decodes the whole photo
MAX_UPLOAD = "200mb"  # Gradio refuses larger uploads before they reach the model
SCALE_PHOTO, SCALE_MODEL = "this photo's range", "the model's range"


# --- input --------------------------------------------------------------------------------------
def read_photo(path: str) -> np.ndarray:
    """The uploaded file as uint8 HxWx3, or a one-line ValueError: not an image, or too large.

    The size is read from the header first, so a huge photo is refused before it is decoded.
    """
    from PIL import Image

    from vpd_ray.data import decode

    name = Path(path).name
    limit = f"the demo takes at most {MAX_SIDE_PX} px a side and {MAX_MEGAPIXELS} megapixels"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own limit, far above ours
        raise ValueError(f"{name} is too large; {limit}") from None
    except OSError:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{name} is not an image (JPEG, PNG, WebP, ...)") from None
    if max(width, height) > MAX_SIDE_PX or width * height > MAX_MEGAPIXELS * 1_000_000:
        raise ValueError(f"{name} is {width}x{height} px; {limit}")
    try:
        return decode.decode_image(Path(path).read_bytes())
    except OSError as err:  # a truncated or corrupt file behind a valid header
        raise ValueError(f"{name} cannot be decoded: {err}") from None


def needs_sentence(task: Any) -> bool:
    """Sentence tasks (referring): the page shows them a sentence box."""
    return "sentence" in task.inference_inputs


def depth_range(task: Any) -> float | None:
    """The model's output range in metres (``max_depth``) for depth tasks, else None."""
    return task.cfg.max_depth if task.output_kind == "depth" else None


# --- the model ----------------------------------------------------------------------------------
def model_size(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The photo downscaled (aspect kept, bilinear) so its longer side is at most ``max_side``."""
    from PIL import Image

    if not max_side or max(image.shape[:2]) <= max_side:
        return image
    small = Image.fromarray(image)
    small.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(small)


def predict(model: Any, task_name: str, image: np.ndarray, sentence: str | None, max_side: int | None,
            device: Any) -> np.ndarray:
    """One photo -> the task's map at the photo's size (float metres, or uint8 class ids / 0-1 mask).

    As batch inference does: the task builds the batch (``inference_batch``; a photo has no meta, so
    depth gets the mean class embedding) and ``to_map`` turns the output into the photo-sized map.
    """
    import torch

    from vpd_ray.inference.predictor import to_map

    fitted = np.array(model_size(image, max_side))  # a writable copy for torch
    pixels = torch.from_numpy(fitted).to(device).permute(2, 0, 1)[None].float() / 255.0  # [1,3,H,W]
    batch = model.tasks[task_name].inference_batch(pixels, [{"meta": {}, "sentence": sentence}], protocol=False)
    with torch.inference_mode():
        output = model(task_name, batch)
    return to_map(output[0], image.shape[:2])


# --- output -------------------------------------------------------------------------------------
def show(task: Any, image: np.ndarray, prediction: np.ndarray, sentence: str | None,
         scale: str = SCALE_PHOTO) -> tuple[np.ndarray, str]:
    """(picture, one-line readout) of a prediction: the task's own panels (``Task.panels``)."""
    panels = task.panels(image, prediction, sentence=sentence, fixed_scale=scale == SCALE_MODEL)
    return vz.render(panels), readout(task.output_kind, prediction, panels[-1], sentence)


def readout(kind: str, prediction: np.ndarray, panel: Any, sentence: str | None) -> str:
    """The numbers under the picture, by ``output_kind``: metres, mask share, or the classes present."""
    if kind == "depth":
        lo, median, hi = np.percentile(prediction, [0, 50, 100])
        return (f"Depth: min {lo:.2f} m · median {median:.2f} m · max {hi:.2f} m; colour scale "
                f"{panel.scale.vmin:.2f}–{panel.scale.vmax:.2f} m.")
    if kind == "mask":
        share = float((prediction > 0).mean())
        return f"Mask: {share:.1%} of the photo ({int((prediction > 0).sum())} px) for “{sentence}”."
    return f"{len(np.unique(prediction))} classes present; largest: {panel.legend[0][0]}."


RAW_SUFFIX = {"depth": "depth_mm", "labels": "labels", "mask": "mask"}  # by output_kind


def write_raw(prediction: np.ndarray, task: Any, directory: Path, stem: str) -> Path:
    """The raw output as ``python -m vpd_ray.infer`` writes it: 16-bit mm PNG or index PNG.

    Label PNGs carry the ADE20K palette (ignored: black) instead of infer's VOC palette, so a viewer
    shows the page's colours; the pixel values, the class ids, are the same.
    """
    from vpd_ray.inference import writers

    path = directory / f"{stem}_{RAW_SUFFIX[task.output_kind]}.png"
    if task.output_kind == "labels":
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: len(vz.ADE20K_PALETTE)] = vz.ADE20K_PALETTE
        palette[vz.IGNORE_INDEX] = vz.IGNORE_RGB
        writers.write_label_png(path, prediction, palette)
    else:
        writers.write_output(task.output_kind, path, prediction)
    return path


# --- the page -----------------------------------------------------------------------------------
class Demo:
    """The loaded package and what one request does with it (Gradio-free, so tests can call it)."""

    def __init__(self, package: str, device: str | None = None, max_side: int | None = 1024):
        import torch

        from vpd_ray.package import load_package

        self.package, self.max_side = package, max_side
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _ = load_package(package)
        self.model.eval().to(self.device)
        self.tasks = sorted(self.model.tasks)
        self._outputs = tempfile.TemporaryDirectory(prefix="vpd_demo_")  # removed when the server stops

    def device_name(self) -> str:
        import torch

        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    def run(self, task_name: str, path: str | None, sentence: str | None,
            scale: str = SCALE_PHOTO) -> tuple[np.ndarray, str, str]:
        """(picture, readout, raw output file) for one upload; a ValueError says what was wrong."""
        if task_name not in self.model.tasks:
            raise ValueError(f"task {task_name!r} is not in this package; it has {', '.join(self.tasks)}")
        task = self.model.tasks[task_name]
        if not path:
            raise ValueError("Upload a photo first.")
        sentence = (sentence or "").strip() or None
        if needs_sentence(task) and sentence is None:
            raise ValueError("Type a sentence that names one object in the photo (the sentence is empty).")
        image = read_photo(path)
        prediction = predict(self.model, task_name, image, sentence, self.max_side, self.device)
        picture, readout = show(task, image, prediction, sentence, scale)
        directory = Path(tempfile.mkdtemp(dir=self._outputs.name))
        return picture, readout, str(write_raw(prediction, task, directory, Path(path).stem))


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks page of ``demo``: inputs left, the picture, readout and download right."""
    import gradio as gr

    first = demo.model.tasks[demo.tasks[0]]

    def on_task(task_name: str):
        task = demo.model.tasks[task_name]
        return gr.update(visible=needs_sentence(task)), gr.update(visible=depth_range(task) is not None)

    def on_predict(task_name, path, sentence, scale):
        try:
            return demo.run(task_name, path, sentence, scale)
        except ValueError as err:  # a bad input: one line in the page, no traceback
            raise gr.Error(str(err), duration=None, print_exception=False) from None

    with gr.Blocks(title=f"VPD demo: {Path(demo.package).name}", analytics_enabled=False) as app:
        gr.Markdown(
            "## VPD: try a model package\n"
            f"Package `{demo.package}` · task{'s' if len(demo.tasks) > 1 else ''}: {', '.join(demo.tasks)} · "
            f"running on **{demo.device_name()}** · photos up to {MAX_SIDE_PX} px a side and {MAX_MEGAPIXELS} "
            f"megapixels, downscaled to {demo.max_side or 'no limit'} px a side for the model (outputs keep the "
            "photo's size); one pass, no test-time protocol.",
            elem_id="header",
        )
        with gr.Row():
            with gr.Column():
                photo = gr.File(label="Photo", file_types=["image"], type="filepath", elem_id="photo")
                task = gr.Radio(demo.tasks, value=demo.tasks[0], label="Task", visible=len(demo.tasks) > 1)
                sentence = gr.Textbox(label="Sentence naming one object", placeholder="the red circle on the left",
                                      visible=needs_sentence(first), elem_id="sentence")
                scale = gr.Radio([SCALE_PHOTO, SCALE_MODEL], value=SCALE_PHOTO, label="Depth colour scale",
                                 visible=depth_range(first) is not None)
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column():
                picture = gr.Image(label="Result", show_label=False, type="numpy", format="png", interactive=False,
                                   elem_id="result")
                readout = gr.Markdown(elem_id="readout")
                raw = gr.File(label="Raw output (depth: 16-bit PNG in mm; labels / mask: index PNG)",
                              interactive=False, elem_id="raw")
        task.change(on_task, task, [sentence, scale])
        inputs, outputs = [task, photo, sentence, scale], [picture, readout, raw]
        button.click(on_predict, inputs, outputs, api_name="predict")
        sentence.submit(on_predict, inputs, outputs, api_name=False)
    return app.queue(default_concurrency_limit=1)  # one model: one prediction at a time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("package", help="model package folder (model.safetensors + config.yaml + architecture.json)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    parser.add_argument("--device", help="torch device (default: cuda where available, else cpu)")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="downscale larger photos to this longer side for the model (0: never)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the server
    try:
        demo = Demo(args.package, args.device, args.max_side or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    print(f"demo: {args.package} ({', '.join(demo.tasks)}) on {demo.device_name()}", file=sys.stderr, flush=True)
    build_app(demo).launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
