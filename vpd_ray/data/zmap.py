"""Integer maps (depth in millimetres, class labels, masks) as shard fields that decode in about a millisecond.

A 16-bit depth PNG of NYU's 480x640 costs a loader core 6-9 ms to decode (zlib plus PNG's Paeth row
filter), more than the JPEG, the crop and the collate of the sample together; that is what bounded
the NYU pipeline (docs/benchmarks.md, Data). The same map as a ``zmap`` field is as small and decodes
about 8x faster:

    zstd frame of:  b"ZMAP" | version u8 (1) | bytes per value u8 (1 or 2) | 2 zero bytes | H u32 | W u32
                    | the value's byte planes, least significant first, each H*W bytes   (little-endian)

Splitting a uint16 map into its low and high byte planes puts the slowly changing high bytes next to
each other, which zstd packs as tightly as PNG's filters (NYU-like maps: 350 KB against PNG's 330 KB;
with sensor noise 379 against 425). The format is lossless: :func:`decode_zmap` returns exactly the
array :func:`encode_zmap` was given. Nothing in it is executed or unpickled; the header is checked
against the frame's declared size before anything is decompressed, so a hostile field cannot make a
loader allocate more than :data:`MAX_VALUES` values.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC, VERSION = b"ZMAP", 1
_HEADER = struct.Struct("<4sBBxxII")  # magic, version, bytes per value, pad, H, W
_DTYPES = {1: np.uint8, 2: np.uint16}
MAX_VALUES = 1 << 26  # 64 M values (8192x8192), far above any dataset's maps
LEVEL = 3  # zstd's default; level 1 is as fast to decode and 1% larger, higher levels gain < 1%


def encode_zmap(array: np.ndarray) -> bytes:
    """uint8 or uint16 ``[H, W]`` -> the field's bytes."""
    import zstandard

    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"a zmap holds a uint8 or uint16 [H, W] map, got {array.dtype} {list(array.shape)}")
    size = array.dtype.itemsize
    planes = np.ascontiguousarray(array.astype(f"<u{size}").view(np.uint8).reshape(-1, size).T)  # [size, H*W]
    header = _HEADER.pack(MAGIC, VERSION, size, *array.shape)
    return zstandard.ZstdCompressor(level=LEVEL).compress(header + planes.tobytes())


def decode_zmap(data: bytes) -> np.ndarray:
    """The field's bytes -> the uint8 or uint16 ``[H, W]`` map; a ValueError saying what is wrong otherwise."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
        if declared < _HEADER.size or declared > _HEADER.size + 2 * MAX_VALUES:
            raise ValueError(f"zmap frame declares {declared} bytes (unknown or out of range)")
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as err:
        raise ValueError(f"not a zstd frame the zmap format declares ({err})") from None
    magic, version, size, height, width = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or size not in _DTYPES:
        raise ValueError(f"not a zmap version {VERSION} field (magic {magic!r}, version {version}, {size} bytes a value)")
    if len(raw) != _HEADER.size + size * height * width:
        raise ValueError(f"zmap holds {len(raw) - _HEADER.size} bytes for a {height}x{width} map of {size}-byte values")
    planes = np.frombuffer(raw, np.uint8, offset=_HEADER.size).reshape(size, height * width)
    if size == 1:
        return planes.reshape(height, width).copy()
    values = planes[1].astype(np.uint16) << 8  # 16x faster than interleaving the planes back
    values |= planes[0]
    return values.reshape(height, width)
