"""Writers for inference outputs: one file per input image, written atomically.

Formats follow what downstream tools already read: depth as a 16-bit PNG in millimetres (the
format of the authors' published NYUv2 predictions and of the shards' ``depth.png``), labels and
referring masks as palette PNGs whose pixel values are the class indices (a viewer shows colours,
``numpy.asarray(Image.open(p))`` gives the indices back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vpd_ray.atomic import atomic_path

# uint16 millimetres: 0 stays "no depth", the top value caps at 65.535 m.
_MM_PER_M = 1000.0
_UINT16_MAX = np.iinfo(np.uint16).max


def atomic_save(image: Image.Image, path: Path) -> None:
    """Save ``image`` to ``path`` whole or not at all (:func:`vpd_ray.atomic.atomic_path`), in the
    format its suffix names (the temporary name's suffix names none)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres (float HxW) -> uint16 millimetres, rounded and clipped to the uint16 range."""
    if depth_m.ndim != 2:
        raise ValueError(f"depth map must be HxW, got shape {depth_m.shape}")
    return np.clip(np.rint(depth_m * _MM_PER_M), 0, _UINT16_MAX).astype(np.uint16)


def write_depth_png(path: Path, depth_m: np.ndarray) -> None:
    """16-bit PNG in millimetres; read back with ``np.asarray(Image.open(path)) / 1000``."""
    atomic_save(Image.fromarray(depth_to_mm(depth_m)), path)


def write_preview(path: Path, picture: np.ndarray) -> None:
    """A rendered picture (uint8 HxWx3, :func:`vpd_ray.visualize.render`) as a PNG."""
    atomic_save(Image.fromarray(picture), path)


def index_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved palette, uint8 ``[num_colors, 3]``.

    Neighbouring indices get clearly different colours and index 0 is black, so a 0/1 referring
    mask shows as black/dark red and 150 ADE20K classes stay distinguishable.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def write_label_png(path: Path, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Palette PNG whose pixel values are the class indices (0..255)."""
    if label.ndim != 2:
        raise ValueError(f"label map must be HxW, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255 for a palette PNG, got {label.min()}..{label.max()}")
    image = Image.fromarray(label.astype(np.uint8))  # mode "L"; putpalette turns it into "P"
    image.putpalette((index_palette() if palette is None else palette).reshape(-1).tolist())
    atomic_save(image, path)


def write_output(kind: str, path: Path, prediction: np.ndarray) -> None:
    """The file of one prediction of a task's ``output_kind``: depth (metres) as a 16-bit mm PNG,
    labels and masks as index PNGs."""
    writers = {"depth": write_depth_png, "labels": write_label_png, "mask": write_label_png}
    if kind not in writers:
        raise ValueError(f"no writer for output kind {kind!r}; known: {', '.join(writers)}")
    writers[kind](path, prediction)
