"""``data.jpeg_decode: device``: train JPEGs cross to the training device still encoded and are decoded
there: on a GPU in one batched ``torchvision.io.decode_jpeg`` call (nvJPEG; needs torchvision built for
the installed torch), on a CPU run by the loader's own decoder (simplejpeg) in the training process.

The JPEG decode is about half of what a loader core does per NYU sample and two thirds per ADE20K
sample (a core with it left for the device gives 2.1-2.2x / 3.0-3.2x the samples/s: docs/benchmarks.md,
Data); here the loader
reads the JPEG's header only (its size, :class:`DeferredImage`), so the task's transform draws every random
choice as it always does, from the sample's rng and in the reference's order, and the geometry it would
have applied goes with the bytes (:class:`PendingImage`). After the host-to-device copy the task's
``augment_on_device`` decodes the batch (:func:`finish_images`) and applies that geometry with its own
``place`` function, the same code the loader path runs. So seeding and resume stay exact, and the crops,
flips, CutDepth and labels are the loader path's (tests/test_device_decode.py compares whole batches).

Images the loader path decodes with Pillow (PNG, grey or CMYK JPEGs) are decoded and placed by the
loader as before and travel finished, so one batch can mix both. A JPEG whose header reads but whose body
does not decode fails the step with a :class:`~vpd_ray.errors.DataError` naming its shard and key, where
the loader path would skip and count it (``data.max_corrupt``): the batch is already on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vpd_ray.errors import DataError, first_line

JPEG_DECODES = ("loader", "device")


@dataclasses.dataclass(frozen=True)
class DeferredImage:
    """A train sample's image as the loader hands it over under ``data.jpeg_decode: device``: a colour
    JPEG's bytes with its size from the header, or the pixels of any other image, which the loader
    decoded (uint8 ``[H, W, 3]``). ``shape`` is the decoded image's either way, so a transform sizes
    its crop from it as from an array; ``source`` names the sample in an error."""

    height: int
    width: int
    source: str  # "shard URL, key KEY"
    jpeg: bytes | None = None
    pixels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3


@dataclasses.dataclass(frozen=True)
class PendingImage:
    """One train sample's image on its way to the device: a JPEG still encoded with the geometry its
    transform drew for it (task-defined ints), or, placed already, uint8 ``[3, h, w]`` (``ready``). A
    plain object, so a batch of them collates into a list (:func:`vpd_ray.data.pipeline.collate`)."""

    image: DeferredImage | None = None
    geometry: tuple[int, ...] = ()
    ready: torch.Tensor | None = None


def place_or_defer(image: np.ndarray | DeferredImage, geometry: tuple[int, ...],
                   place: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor | PendingImage:
    """A transform's image: ``place(pixels)`` (its crop, flip, ... on the CPU) where the loader decoded
    it, kept for the device with its ``geometry`` where it did not. Under ``data.jpeg_decode: device``
    every sample's image is a PendingImage, placed or not, so that a batch collates the same way."""
    if not isinstance(image, DeferredImage):
        return place(image)
    if image.jpeg is None:
        return PendingImage(ready=place(image.pixels))
    return PendingImage(image, geometry)


def _torchvision_decode(jpegs: Sequence[DeferredImage], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG through torchvision: one call for the batch (its batched decode), bytes from the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j.jpeg), dtype=torch.uint8) for j in jpegs]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _host_decode(jpegs: Sequence[DeferredImage], device: torch.device) -> list[torch.Tensor]:
    """libjpeg-turbo in this process (simplejpeg, as the loader decodes): a CPU run's "device"."""
    import simplejpeg

    return [torch.from_numpy(simplejpeg.decode_jpeg(j.jpeg, "RGB")).permute(2, 0, 1) for j in jpegs]


def decode_jpegs(jpegs: Sequence[DeferredImage], device: torch.device) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` RGB per JPEG on ``device``: nvJPEG on CUDA (``torchvision.io.decode_jpeg``,
    one batched call), else simplejpeg in this process, the loader's own decoder, so a CPU run's batches
    are the loader path's exactly. A body that does not decode is a DataError naming its sample (found
    by decoding one at a time, only after the batch failed)."""
    decode = _torchvision_decode if device.type == "cuda" else _host_decode
    try:
        images = decode(jpegs, device)
    except (RuntimeError, ValueError):  # torchvision's checks; simplejpeg's
        for jpeg in jpegs:
            try:
                decode([jpeg], device)
            except (RuntimeError, ValueError) as err:
                raise DataError(f"{jpeg.source}: JPEG does not decode on {device}: {first_line(err)} (with "
                                "data.jpeg_decode=loader such a sample is skipped and counted)") from None
        raise
    for jpeg, image in zip(jpegs, images):
        if tuple(image.shape) != (3, jpeg.height, jpeg.width):
            raise DataError(f"{jpeg.source}: JPEG decoded to {tuple(image.shape)}, its header says "
                            f"{(3, jpeg.height, jpeg.width)}")
    return images


def finish_images(images: torch.Tensor | list[PendingImage], device: torch.device,
                  place: Callable[[int, torch.Tensor, tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    """A train batch's uint8 images ``[B, 3, h, w]`` on ``device``: a tensor (the loader decoded them) as
    it is; a list of :class:`PendingImage` decoded here, each placed by ``place(index in the batch,
    uint8 [3, H, W] image, geometry)`` (the task's crop / flip / resize for that sample)."""
    if torch.is_tensor(images):
        return images
    encoded = [i for i, item in enumerate(images) if item.image is not None]
    decoded = dict(zip(encoded, decode_jpegs([images[i].image for i in encoded], device)))
    return torch.stack([place(i, decoded[i], item.geometry) if i in decoded else item.ready.to(device)
                        for i, item in enumerate(images)])
