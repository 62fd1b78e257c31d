"""Whitelist decoding of shard samples.

webdataset's and Ray Data's default decoders unpickle ``.pkl/.pth/.pyd`` fields, which turns an
untrusted shard into remote code execution. Here every field extension must be in
:data:`KNOWN_FIELDS`; anything else (pkl, pth, pyd, npy, ...) raises :class:`ForbiddenFieldError`
naming the shard and key, and is never parsed. Known fields a task did not ask for are dropped
without being decoded.

Decoded sample (see docs/architecture.md): ``image`` uint8 HxWx3, ``depth`` float32 HxW metres,
``label`` / ``mask`` uint8 HxW, ``meta`` dict, plus ``__key__`` and ``__url__``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

IMAGE_FIELDS = ("jpg", "jpeg", "png")
# shard extension -> decoded sample key
KNOWN_FIELDS = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "depth.png": "depth",
    "label.png": "label",
    "mask.png": "mask",
    "json": "meta",
}
DEPTH_SCALE = 1000.0  # depth PNGs hold uint16 millimetres


class ForbiddenFieldError(ValueError):
    """A shard field outside the whitelist: a configuration or security problem, never skipped."""


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded; the pipeline skips and counts it."""


def _open_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 ``[H, W, 3]`` RGB."""
    return np.asarray(_open_image(data).convert("RGB"))


def decode_depth(data: bytes) -> np.ndarray:
    """uint16 millimetre PNG -> float32 ``[H, W]`` metres (0 = no measurement)."""
    image = _open_image(data)
    if image.mode not in ("I;16", "I;16B", "I"):
        raise ValueError(f"depth PNG has mode {image.mode}, expected 16-bit grayscale")
    return np.asarray(image).astype(np.float32) / DEPTH_SCALE


def decode_index_png(data: bytes) -> np.ndarray:
    """8-bit label or mask PNG -> uint8 ``[H, W]``, values as stored (palette indices stay indices)."""
    image = _open_image(data)
    if image.mode not in ("L", "P"):
        raise ValueError(f"label/mask PNG has mode {image.mode}, expected 8-bit L or P")
    return np.asarray(image, dtype=np.uint8)


_DECODERS = {
    "image": decode_image,
    "depth": decode_depth,
    "label": decode_index_png,
    "mask": decode_index_png,
    "meta": lambda data: json.loads(data.decode("utf-8")),
}


def wanted_extensions(fields: Iterable[str] | None) -> set[str]:
    """The extensions to decode for a task's ``fields`` (None: every known field); any image
    extension stands for all three."""
    if fields is None:
        return set(KNOWN_FIELDS)
    fields = set(fields)
    unknown = fields - set(KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}")
    if fields & set(IMAGE_FIELDS):
        fields |= set(IMAGE_FIELDS)
    return fields


def decode_sample(raw: dict[str, bytes], key: str, url: str, wanted: set[str]) -> dict[str, Any]:
    """Decode the ``wanted`` extensions of one raw sample.

    Raises ForbiddenFieldError for a field outside the whitelist and CorruptSampleError for
    undecodable bytes or a wanted field that is missing.
    """
    forbidden = sorted(ext for ext in raw if ext not in KNOWN_FIELDS)
    if forbidden:
        raise ForbiddenFieldError(
            f"shard {url}, key {key}: field(s) {forbidden} are not in the decode whitelist "
            f"{sorted(KNOWN_FIELDS)}; refusing to read this shard"
        )
    sample: dict[str, Any] = {"__key__": key, "__url__": url}
    for ext, data in raw.items():
        if ext not in wanted:
            continue
        name = KNOWN_FIELDS[ext]
        try:
            sample[name] = _DECODERS[name](data)
        except Exception as err:  # PIL and json raise many types for bad bytes
            raise CorruptSampleError(f"shard {url}, key {key}, field {ext}: {type(err).__name__}: {err}") from None
    missing = {KNOWN_FIELDS[ext] for ext in wanted} - set(sample) if wanted != set(KNOWN_FIELDS) else set()
    if missing:
        raise CorruptSampleError(f"shard {url}, key {key}: missing field(s) {sorted(missing)}")
    return sample
