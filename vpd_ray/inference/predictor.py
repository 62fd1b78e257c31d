"""The predictor: one model per actor, mapping batches of raw inputs to files on disk.

Ray Data's batch-inference pattern (STYLE.md): ``__init__`` loads the model package once,
``__call__`` maps one batch. Outputs are written inside the actor, so only a small status row per
image travels back to the driver. The same class run in-process is the plain-loop baseline of
``python -m vpd_ray.bench infer``, so both paths share every line of model code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vpd_ray.data import decode
from vpd_ray.inference import sources, writers
from vpd_ray.inference.sources import FAILED, SKIPPED, WRITTEN


def row_meta(row: dict[str, Any]) -> dict[str, Any]:
    """A shard row's ``json`` metadata (the task reads what it needs, e.g. depth's scene class, as in
    evaluation), ``{}`` for a photo; a malformed field is an error naming it."""
    raw = row.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"unreadable json field: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"json field is a {type(meta).__name__}, not an object")
    return meta


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Ray's column batch -> a list of row dicts (a shard row's with the fields its sample has)."""
    n = len(next(iter(batch.values())))
    return [sources.present_fields({key: column[i] for key, column in batch.items()}) for i in range(n)]


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (keeping the aspect ratio) so the longer side is at most ``max_side``."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


class Predictor:
    """Callable class for ``Dataset.map_batches``: raw input rows in, status rows out.

    Rows carry the image as ``bytes`` (folder/glob), a ``path`` to read (referring pairs, with
    ``sentence``) or whitelisted shard fields (``jpg``/``png``, ``json``). Each image is decoded,
    predicted at (at most) ``max_side`` and written at its original size; an image that cannot be
    read or decoded becomes a ``failed`` row with the reason instead of stopping the job. The shard
    read's own verdicts (a ``status`` column: refused shard, cut shard) pass through unchanged.
    """

    def __init__(
        self,
        package: str,
        output_dir: str,
        task: str,
        protocol: bool = False,
        preview: bool = False,
        root: str = "",
        max_side: int | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ):
        import torch

        from vpd_ray.package import load_package

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _ = load_package(package)
        self.model.eval().to(self.device)
        self.task = self.model.tasks[task]  # checked on the driver (runner.resolve_task)
        self.output_dir = Path(output_dir)
        self.protocol, self.preview, self.root, self.max_side = protocol, preview, root, max_side
        self.dtype = dtype  # "bf16": autocast (vpd_ray.engine.speed.autocast)

    # --- one batch ----------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        statuses: list[tuple[str, str, str, str]] = []  # (source, name, status, error)
        todo: list[tuple[str, str, np.ndarray, dict[str, Any]]] = []  # (source, name, image, task inputs)
        for row in _rows(batch):
            source, name = self._identify(row)
            if row.get("status"):
                statuses.append((source, name, str(row["status"]), str(row["error"])))
                continue
            if sources.output_path(self.output_dir, name).exists():
                statuses.append((source, name, SKIPPED, ""))
                continue
            try:
                image, inputs = self._decode(row), {"meta": row_meta(row), "sentence": row.get("sentence")}
            except Exception as err:  # noqa: BLE001 - any unreadable input is reported, not fatal
                statuses.append((source, name, FAILED, f"{type(err).__name__}: {err}"))
                continue
            todo.append((source, name, image, inputs))
        predictions = self.predict([t[2] for t in todo], [t[3] for t in todo])
        for (source, name, image, inputs), prediction in zip(todo, predictions):
            if isinstance(prediction, str):
                statuses.append((source, name, FAILED, prediction))
                continue
            self._write(name, prediction)
            if self.preview:
                self._write_preview(name, image, prediction, inputs.get("sentence"))
            statuses.append((source, name, WRITTEN, ""))
        columns = list(zip(*statuses)) if statuses else [(), (), (), ()]
        keys = ("source", "name", "status", "error")
        return {key: np.array(values, dtype=object) for key, values in zip(keys, columns)}

    def _identify(self, row: dict[str, Any]) -> tuple[str, str]:
        """(what to name in the report, output name) of one row."""
        if "__key__" in row:  # a shard-wide verdict has no key: it names the shard
            key = str(row["__key__"])
            return f"{row['__url__']}#{key}" if key else str(row["__url__"]), key
        if "name" in row:
            return str(row["path"]), str(row["name"])
        return str(row["path"]), sources.output_name(str(row["path"]), self.root)

    @staticmethod
    def _decode(row: dict[str, Any]) -> np.ndarray:
        """The row's image as uint8 HxWx3: a shard sample's as training decodes it, a file's as a
        viewer shows it (:func:`vpd_ray.data.decode.decode_image`)."""
        if "__key__" in row:
            raw = {ext: row[ext] for ext in sources.SHARD_FIELDS if ext != "json" and ext in row}
            wanted = set(decode.IMAGE_FIELDS)  # a sample without an image is "missing field(s) ['image']"
            return decode.decode_sample(raw, str(row["__key__"]), str(row["__url__"]), wanted)["image"]
        data = row["bytes"] if "bytes" in row else Path(row["path"]).read_bytes()
        return decode.decode_image(data)

    def _write(self, name: str, prediction: np.ndarray) -> None:
        """The writer of the task's ``output_kind`` (depth: 16-bit mm PNG; labels, masks: index PNGs)."""
        writers.write_output(self.task.output_kind, sources.output_path(self.output_dir, name), prediction)

    def _write_preview(self, name: str, image: np.ndarray, prediction: np.ndarray, sentence: str | None) -> None:
        """``OUT/preview/NAME.png``: the task's picture of the prediction (depth on the model's fixed
        0..max_depth m scale with its colour bar, so previews of one folder compare; seg with a class
        legend; refer with the sentence). An existing preview is kept, as existing outputs are."""
        from vpd_ray.visualize import render

        path = preview_path(self.output_dir, name)
        if not path.exists():
            panels = self.task.panels(image, prediction, sentence=sentence, fixed_scale=True)
            writers.write_preview(path, render(panels))

    # --- the model ----------------------------------------------------------------------------
    def predict(self, images: list[np.ndarray], inputs: list[dict[str, Any]] | None = None) -> list[np.ndarray | str]:
        """Per image: its prediction at its own size (float HxW for a regression map, uint8 HxW for
        labels), or the reason the model refused it (e.g. a protocol that needs another image size).

        ``inputs``: per image, what the task's ``inference_batch`` reads (``meta``, ``sentence``;
        default: none). Images of equal size after ``max_side`` share one forward pass.
        """
        inputs = inputs or [{"meta": {}, "sentence": None} for _ in images]
        results: list[np.ndarray | str] = [""] * len(images)
        fitted = [_fit(image, self.max_side) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(fitted):
            groups.setdefault(image.shape, []).append(i)
        for indices in groups.values():
            try:
                outputs = self._forward(np.stack([fitted[i] for i in indices]), [inputs[i] for i in indices],
                                        [images[i].shape[:2] for i in indices])
            except ValueError as err:  # the task's own check of its inputs, e.g. window vs image size
                outputs = [f"ValueError: {err}"] * len(indices)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    def _forward(self, images: np.ndarray, inputs: list[dict[str, Any]], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """One stacked batch ``[B,H,W,3]`` uint8 -> per-image maps resized to ``sizes``."""
        import torch

        from vpd_ray.engine.speed import autocast

        pixels = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # [B,3,H,W]
        batch = self.task.inference_batch(pixels, inputs, self.protocol)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            output = self.model.predict(self.task.name, batch) if self.protocol else self.model(self.task.name, batch)
        return [to_map(item, size) for item, size in zip(output, sizes)]


def to_map(output: Any, size: tuple[int, int]) -> np.ndarray:
    """One image's model output -> a map of ``size``: float HxW (regression, ``[1,h,w]`` scores),
    uint8 HxW class ids (``[C,h,w]`` scores, resized before the argmax, or ``[h,w]`` / ``[1,h,w]``
    integer labels from a protocol, resized by nearest neighbour)."""
    import torch
    import torch.nn.functional as F

    if output.is_floating_point():
        scores = output if output.ndim == 3 else output[None]  # [C,h,w]
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        if scores.shape[0] == 1:
            return scores[0].float().cpu().numpy()
        return scores.argmax(0).to(torch.uint8).cpu().numpy()
    labels = output.reshape(output.shape[-2:])  # [h,w] (a protocol's one sentence slot included)
    if tuple(labels.shape) != tuple(size):
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0]
    return labels.to(torch.uint8).cpu().numpy()


def preview_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "preview" / f"{name}.png"
