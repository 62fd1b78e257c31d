"""Whitelist decoding of shard samples.

webdataset's and Ray Data's default decoders unpickle ``.pkl/.pth/.pyd`` fields, which turns an
untrusted shard into remote code execution. Here every field extension must be in
:data:`KNOWN_FIELDS`; anything else (pkl, pth, pyd, npy, ...) raises :class:`ForbiddenFieldError`
naming the shard and key, and is never parsed. Known fields a task did not ask for are dropped
without being decoded.

Decoded sample (see docs/architecture.md): ``image`` uint8 HxWx3, ``depth`` float32 HxW metres,
``label`` / ``mask`` uint8 HxW, ``meta`` dict, ``caption`` str (a ``txt`` field, UTF-8), plus
``__key__`` and ``__url__``. A caption is optional: a sample without one is not corrupt, and the
task that reads captions (``context: caption``) names a shard without them in its own error.

Images that cannot be shown as 8-bit RGB as they are (16-bit, palette, alpha, CMYK, grayscale) are
converted as a viewer shows them or refused with a ValueError naming why (:func:`decode_image`),
never clipped; 8-bit RGB, every training shard's image, is returned exactly as stored.

Decoders, picked by measurement (docs/benchmarks.md, Data): colour (YCbCr) JPEGs of shard samples go
through simplejpeg, libjpeg-turbo called directly, about 2x faster than Pillow's decode of the same
file (Pillow reads through its plugin layer and copies the result twice) and pixel-identical to it
(same library, same default IDCT and upsampling). Everything else (grey or CMYK JPEGs, EXIF
orientation, PNGs, 16-bit depth) takes Pillow: for 16-bit PNGs OpenCV is no faster (zlib and the
PNG row filters are the cost in both), so it would be a 60 MB dependency for nothing. The converters
write depth, label and mask maps as ``zmap`` fields instead (:mod:`vpd_ray.data.zmap`: zstd byte
planes, lossless, about 8x faster to decode than a 16-bit PNG); PNG maps (older shards, the synthetic
samples) decode as before, and a task asks for either by naming one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from vpd_ray.data.device_decode import DeferredImage
from vpd_ray.data.zmap import decode_zmap
from vpd_ray.errors import DataError

IMAGE_FIELDS = ("jpg", "jpeg", "png")
# shard extension -> decoded sample key
KNOWN_FIELDS = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "depth.png": "depth",
    "depth.zmap": "depth",
    "label.png": "label",
    "label.zmap": "label",
    "mask.png": "mask",
    "mask.zmap": "mask",
    "json": "meta",
    "txt": "caption",
}
# Decoded where present, never required here: a task that needs one raises its own error (a whole
# shard set without captions is a setup error, not corrupt samples to skip).
OPTIONAL_FIELDS = ("txt",)
DEPTH_SCALE = 1000.0  # depth PNGs hold uint16 millimetres
# The VAE encodes 8x8 pixels into one latent cell: a smaller image is less than one cell of content.
MIN_SIDE = 8
GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit grayscale PNG / TIFF
_GRAY16_TO_8 = 257  # 65535 / 255: the full 16-bit range onto 0..255, and 8-bit k stored as k * 257 back to k


class ForbiddenFieldError(DataError, ValueError):
    """A shard field outside the whitelist: a configuration or security problem, never skipped.

    A DataError, so every layer treats it as deterministic (no retry); a ValueError for the callers
    that caught it as one.
    """


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded; the pipeline skips and counts it."""


def _open_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _colour_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a YCbCr JPEG (every photo a camera or a dataset stores), from its header;
    None for anything else (not a JPEG, grey, CMYK), which Pillow decodes. A header that does not parse
    raises, as Pillow would."""
    import simplejpeg

    if not data.startswith(b"\xff\xd8"):
        return None
    height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    if colourspace != "YCbCr":
        return None
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"image is {width}x{height} px; the model needs at least {MIN_SIDE} px a side")
    return height, width


def _colour_jpeg(data: bytes) -> np.ndarray | None:
    """A YCbCr JPEG -> uint8 ``[H, W, 3]`` RGB via simplejpeg; None for any other image
    (:func:`_colour_jpeg_size`). Corrupt or truncated data raises, as Pillow would."""
    import simplejpeg

    if _colour_jpeg_size(data) is None:
        return None
    # Decoded with a padding byte a pixel (libjpeg-turbo writes it for free) and returned as the RGB view:
    # a resize then takes torch's 4-channel kernel, 2x faster than its 3-channel one, without a copy
    # (vpd_ray.data.augment.seg.resize_image).
    return simplejpeg.decode_jpeg(data, "RGBX")[..., :3]


def decode_image(data: bytes, orient: bool = True) -> np.ndarray:
    """Image bytes -> uint8 ``[H, W, 3]`` RGB as a viewer shows the file, or a ValueError saying why not.

    ``orient``: apply the EXIF orientation (a phone photo stored sideways). Shard samples are decoded
    without it (:func:`decode_sample`), since their label, mask and depth fields are aligned with the
    stored pixels (COCO's masks ignore the EXIF orientation of its photos); without it a colour JPEG
    takes the fast decoder (:func:`_colour_jpeg`). Images smaller than :data:`MIN_SIDE` a side are
    refused. See :func:`to_rgb` for the conversions.
    """
    from PIL import ImageOps

    if not orient and (rgb := _colour_jpeg(data)) is not None:
        return rgb
    image = _open_image(data)
    if orient:
        ImageOps.exif_transpose(image, in_place=True)
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"image is {image.width}x{image.height} px; the model needs at least {MIN_SIDE} px a side")
    return to_rgb(image)


def to_rgb(image: Any) -> np.ndarray:
    """A PIL image -> uint8 ``[H, W, 3]`` RGB, never clipped.

    8-bit RGB: as stored. 16-bit grayscale: ``round(v / 257)``, the full 0..65535 range onto 0..255
    (PIL's own conversion clips at 255, which turns most of a 16-bit photo white); a fixed scale, not
    the image's own min..max, so brightness is kept. Transparency (RGBA, LA, a palette's or a
    colour key's): composited on white, as a viewer shows it on a page; the colour stored under a
    transparent pixel is arbitrary (often black). L, 1, P, CMYK, YCbCr: PIL's conversion (grey
    replicated, the palette looked up, CMYK by PIL's formula without a colour profile). 32-bit
    integer or float images have no fixed range and are refused.
    """
    from PIL import Image

    if image.mode in GRAY16_MODES:
        gray = (np.asarray(image).astype(np.uint32) + _GRAY16_TO_8 // 2) // _GRAY16_TO_8
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise ValueError(f"image mode {image.mode} (32-bit {'integer' if image.mode == 'I' else 'float'}) has no "
                         "fixed range to map to 8 bits; save it as 8-bit RGB or 16-bit grayscale")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"))  # a writable array, as the JPEG decoder returns


def decode_depth_mm(data: bytes) -> np.ndarray:
    """16-bit grayscale depth PNG -> its uint16 millimetres ``[H, W]``, exactly as stored."""
    image = _open_image(data)
    if image.mode not in ("I;16", "I;16B", "I"):
        raise ValueError(f"depth PNG has mode {image.mode}, expected 16-bit grayscale")
    mm = np.asarray(image)
    if mm.dtype != np.uint16 and (mm.min() < 0 or mm.max() > np.iinfo(np.uint16).max):  # mode I: 32-bit
        raise ValueError(f"depth PNG holds values {mm.min()}..{mm.max()}, outside 16-bit millimetres")
    return mm.astype(np.uint16, copy=False)


def _metres(mm: np.ndarray) -> np.ndarray:
    """uint16 millimetres -> float32 metres, the one conversion of both depth formats."""
    metres = mm.astype(np.float32)
    metres /= DEPTH_SCALE
    return metres


def decode_depth(data: bytes) -> np.ndarray:
    """uint16 millimetre PNG -> float32 ``[H, W]`` metres (0 = no measurement)."""
    return _metres(decode_depth_mm(data))


def decode_depth_zmap(data: bytes) -> np.ndarray:
    """uint16 millimetre :mod:`~vpd_ray.data.zmap` field -> float32 ``[H, W]`` metres (0 = no measurement)."""
    depth = decode_zmap(data)
    if depth.dtype != np.uint16:
        raise ValueError(f"depth zmap holds {depth.dtype}, expected uint16 millimetres")
    return _metres(depth)


def decode_index_zmap(data: bytes) -> np.ndarray:
    """8-bit label or mask :mod:`~vpd_ray.data.zmap` field -> uint8 ``[H, W]``."""
    index = decode_zmap(data)
    if index.dtype != np.uint8:
        raise ValueError(f"label/mask zmap holds {index.dtype}, expected uint8")
    return index


def decode_index_png(data: bytes) -> np.ndarray:
    """8-bit label or mask PNG -> uint8 ``[H, W]``, values as stored (palette indices stay indices)."""
    image = _open_image(data)
    if image.mode not in ("L", "P"):
        raise ValueError(f"label/mask PNG has mode {image.mode}, expected 8-bit L or P")
    return np.asarray(image, dtype=np.uint8)


def _shard_image(data: bytes) -> np.ndarray:
    return decode_image(data, orient=False)  # aligned with the label fields (decode_image)


# shard extension -> its decoder (KNOWN_FIELDS names what it decodes to)
_DECODERS = {
    **dict.fromkeys(IMAGE_FIELDS, _shard_image),
    "depth.png": decode_depth,
    "depth.zmap": decode_depth_zmap,
    "label.png": decode_index_png,
    "label.zmap": decode_index_zmap,
    "mask.png": decode_index_png,
    "mask.zmap": decode_index_zmap,
    "json": lambda data: json.loads(data.decode("utf-8")),
    "txt": lambda data: data.decode("utf-8").strip(),
}


def wanted_extensions(fields: Iterable[str] | None) -> set[str]:
    """The extensions to decode for a task's ``fields`` (None: every known field); each stands for every
    extension that decodes to the same key (``jpg`` for ``png`` and ``jpeg``, ``depth.png`` for
    ``depth.zmap``), so a task reads shards of either format."""
    if fields is None:
        return set(KNOWN_FIELDS)
    fields = set(fields)
    unknown = fields - set(KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}")
    keys = {KNOWN_FIELDS[ext] for ext in fields}
    return {ext for ext, key in KNOWN_FIELDS.items() if key in keys}


def check_fields(extensions: Iterable[str], key: str, url: str) -> None:
    """Raise ForbiddenFieldError naming the shard, the key and every field of the sample outside the
    whitelist; the one check of training and of inference (which runs it over a whole shard first)."""
    forbidden = sorted(ext for ext in extensions if ext not in KNOWN_FIELDS)
    if forbidden:
        raise ForbiddenFieldError(
            f"shard {url}, key {key}: field(s) {forbidden} are not in the decode whitelist "
            f"{sorted(KNOWN_FIELDS)}; refusing to read this shard"
        )


def _defer_image(data: bytes, key: str, url: str) -> DeferredImage:
    """A colour JPEG left encoded (its header read and checked), any other image decoded here."""
    source = f"shard {url}, key {key}"
    if (hw := _colour_jpeg_size(data)) is not None:
        return DeferredImage(*hw, source, jpeg=data)
    pixels = _shard_image(data)
    return DeferredImage(*pixels.shape[:2], source, pixels=pixels)


def decode_sample(raw: dict[str, bytes], key: str, url: str, wanted: set[str],
                  defer_jpeg: bool = False) -> dict[str, Any]:
    """Decode the ``wanted`` extensions of one raw sample; ``defer_jpeg``: a colour JPEG image stays
    encoded and every image comes as a :class:`~vpd_ray.data.device_decode.DeferredImage`
    (``data.jpeg_decode: device``).

    Raises ForbiddenFieldError for a field outside the whitelist and CorruptSampleError for
    undecodable bytes (a deferred JPEG: an unreadable header) or a wanted field that is missing.
    """
    check_fields(raw, key, url)
    sample: dict[str, Any] = {"__key__": key, "__url__": url}
    for ext, data in raw.items():
        if ext not in wanted:
            continue
        try:
            deferred = defer_jpeg and ext in IMAGE_FIELDS
            sample[KNOWN_FIELDS[ext]] = _defer_image(data, key, url) if deferred else _DECODERS[ext](data)
        except Exception as err:  # PIL and json raise many types for bad bytes
            raise CorruptSampleError(f"shard {url}, key {key}, field {ext}: {type(err).__name__}: {err}") from None
    required = {KNOWN_FIELDS[ext] for ext in wanted if ext not in OPTIONAL_FIELDS}
    missing = required - set(sample) if wanted != set(KNOWN_FIELDS) else set()
    if missing:
        raise CorruptSampleError(f"shard {url}, key {key}: missing field(s) {sorted(missing)}")
    return sample
