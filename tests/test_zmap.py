"""zmap fields: lossless, refused with a reason when malformed, and read by tasks wherever a PNG map was."""

import numpy as np
import pytest
import zstandard

from vpd_ray.data.decode import (
    CorruptSampleError,
    decode_depth,
    decode_sample,
    wanted_extensions,
)
from vpd_ray.data.writer import encode_png
from vpd_ray.data.zmap import _HEADER, MAGIC, decode_zmap, encode_zmap
from vpd_ray.tasks.depth import DepthTask
from vpd_ray.tasks.refer import ReferTask
from vpd_ray.tasks.seg import SegTask


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (480, 640), (13, 5)])
def test_round_trip_is_exact_over_the_full_range(dtype, shape):
    values = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    decoded = decode_zmap(encode_zmap(values))
    assert decoded.dtype == dtype and np.array_equal(decoded, values)


@pytest.mark.parametrize("array", [np.zeros((4, 4), np.int32), np.zeros((4, 4, 3), np.uint8), np.zeros(4, np.uint16)])
def test_only_2d_uint8_or_uint16_maps_are_written(array):
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_zmap(array)


def _frame(payload: bytes, write_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=write_size).compress(payload)


@pytest.mark.parametrize("data, reason", [
    (b"\x89PNG\r\n\x1a\n", "declares"),  # not a zstd frame at all
    (_frame(b"x" * 32, write_size=False), "declares"),  # a frame without its size: never decompressed blind
    (_frame(_HEADER.pack(b"NOPE", 1, 2, 2, 2) + bytes(8)), "not a zmap"),
    (_frame(_HEADER.pack(MAGIC, 9, 2, 2, 2) + bytes(8)), "not a zmap"),
    (_frame(_HEADER.pack(MAGIC, 1, 4, 2, 2) + bytes(16)), "not a zmap"),
    (_frame(_HEADER.pack(MAGIC, 1, 2, 2, 2) + bytes(7)), "holds 7 bytes for a 2x2 map"),
    (_frame(_HEADER.pack(MAGIC, 1, 1, 100000, 100000) + bytes(8)), "holds 8 bytes"),  # a size that is not there
])
def test_malformed_fields_are_refused_with_the_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_zmap(data)


def test_a_depth_zmap_decodes_like_the_depth_png_it_replaces():
    mm = np.random.default_rng(1).integers(0, 10000, (24, 32), dtype=np.uint16)
    png, zmap = encode_png(mm), encode_zmap(mm)
    wanted = wanted_extensions(DepthTask.fields)  # a task names depth.png and reads either
    from_png = decode_sample({**_image_and_meta(), "depth.png": png}, "k", "u.tar", wanted)
    from_zmap = decode_sample({**_image_and_meta(), "depth.zmap": zmap}, "k", "u.tar", wanted)
    assert from_zmap["depth"].dtype == np.float32
    assert np.array_equal(from_zmap["depth"], from_png["depth"]) and np.array_equal(from_png["depth"], decode_depth(png))


@pytest.mark.parametrize("task, field, key", [(SegTask, "label.zmap", "label"), (ReferTask, "mask.zmap", "mask")])
def test_label_and_mask_zmaps_reach_their_tasks(task, field, key):
    label = np.arange(48, dtype=np.uint8).reshape(6, 8)
    sample = decode_sample({**_image_and_meta(), field: encode_zmap(label)}, "k", "u.tar", wanted_extensions(task.fields))
    assert np.array_equal(sample[key], label)


@pytest.mark.parametrize("field, array", [("depth.zmap", np.zeros((4, 4), np.uint8)),
                                          ("label.zmap", np.zeros((4, 4), np.uint16)),
                                          ("depth.zmap", None)])
def test_a_wrong_or_broken_zmap_is_a_corrupt_sample_naming_the_field(field, array):
    data = b"\x28\xb5\x2f\xfd garbage" if array is None else encode_zmap(array)
    with pytest.raises(CorruptSampleError, match=f"shard u.tar, key k, field {field}"):
        decode_sample({**_image_and_meta(), field: data}, "k", "u.tar", wanted_extensions(None))


def _image_and_meta() -> dict[str, bytes]:
    """The image and json fields every task reads besides its map."""
    from vpd_ray.data.writer import encode_jpeg

    return {"jpg": encode_jpeg(np.zeros((8, 8, 3), np.uint8)), "json": b"{}"}
