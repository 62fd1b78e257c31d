"""Writing webdataset shards: bounded size, atomic, resumable, parallel, with a manifest.

A conversion is a deterministic list of :class:`SourceItem` (one per output sample; train splits
in the seeded order of :func:`shuffled`). It is cut into shards by count and by estimated bytes
*before* anything is read, so a re-run cuts it the same way: a shard whose final ``.tar`` exists is
complete (it only ever appears by rename of a finished temp file) and is skipped, which is how an
interrupted conversion resumes; one that does not hold its planned keys, in order, is stale. Missing
or unreadable sources are skipped, listed in the manifest and counted; more than ``max_missing`` of
them (a share), or all of them, fails the conversion after the manifest is written.

The manifest says whether the shards beside it are fit to train on: ``"complete": false`` with a
``"reason"`` from the moment the first shard may be written until the conversion passes its limits,
so neither an interrupted nor a failed conversion looks complete, and the stream refuses such shards
(:func:`vpd_ray.data.tario.incomplete_reason`). Errors found before anything is written (an empty
list, duplicate keys, stale shards) leave the folder as it was.

Output: ``<out>/<prefix>-000000.tar ...`` and ``<out>/<prefix>.manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np

from vpd_ray.atomic import atomic_path, atomic_write, remove_temporaries
from vpd_ray.data.tario import MANIFEST_SUFFIX, iter_raw_samples
from vpd_ray.data.zmap import encode_zmap
from vpd_ray.errors import DataError

MANIFEST_FORMAT = "vpd_ray-shards/1"
IN_PROGRESS = "the conversion is running or was interrupted; re-run the same command to finish it"
JPEG_QUALITY = 90  # synthetic images; real images are stored as read


class UnreadableSourceError(Exception):
    """A source file that is missing or cannot be read; the sample is skipped and listed."""


class ConversionError(DataError):
    """The conversion cannot produce a trustworthy result (no or too many missing sources, stale shards)."""


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One output sample: its key, how to produce its fields, and an estimate of their size.

    ``load`` must be picklable (a ``functools.partial`` of a module-level function) so that
    worker processes can run it; it returns ``{ext: bytes}`` or raises UnreadableSourceError.
    """

    key: str
    load: Callable[[], dict[str, bytes]]
    est_bytes: int
    source: str


def manifest_path(out_dir: str, prefix: str) -> str:
    return os.path.join(out_dir, prefix + MANIFEST_SUFFIX)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def read_source(path: str, verify_image: bool = False) -> bytes:
    """Bytes of a source file exactly as stored; with ``verify_image``, checked to be a readable image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UnreadableSourceError(f"{path}: {err.strerror or err}") from None
    if verify_image:
        from PIL import Image

        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception as err:  # PIL raises many types for bad files
            raise UnreadableSourceError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return data


def read_map(path: str, decode: Callable[[bytes], np.ndarray]) -> bytes:
    """A source depth / label / mask PNG as a :mod:`~vpd_ray.data.zmap` field of the same values.

    ``decode``: the PNG's decoder to integer values (``decode_depth_mm``, ``decode_index_png``), whose
    checks of the file's mode apply; a file it refuses is unreadable (the sample is skipped and listed).
    Stored as zmap because a loader core decodes it about 8x faster than the PNG (docs/benchmarks.md, Data).
    """
    data = read_source(path)
    try:
        values = decode(data)
    except Exception as err:  # PIL raises many types for bad files
        raise UnreadableSourceError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return encode_zmap(values)


def encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """uint8 -> 8-bit grayscale PNG, uint16 -> 16-bit grayscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def key_from_path(relpath: str) -> str:
    """A stable webdataset key from a source path: no dots or slashes (the key ends at the first dot)."""
    stem = os.path.splitext(relpath.strip("/"))[0]
    return stem.replace("/", "__").replace(".", "_")


def shuffled(items: list[SourceItem], seed: int | None) -> list[SourceItem]:
    """``items`` sorted by a hash of ``seed`` and each key (a seeded random order); as given if ``seed`` is None.

    Train splits are written so because each training loader slot streams one contiguous range of
    the shards: in list order (consecutive frames of one scene) its batches would hold a scene or
    two, shuffled they are draws from the whole split. The order depends on the seed and the keys
    only, not on an RNG stream a library update could change, so a re-run cuts the same shards.
    """
    if seed is None:
        return items
    return sorted(items, key=lambda item: hashlib.sha256(f"{seed}/{item.key}".encode("utf-8")).digest())


def plan_shards(items: list[SourceItem], max_count: int, max_bytes: int) -> list[list[SourceItem]]:
    """Consecutive groups of at most ``max_count`` items and about ``max_bytes`` (an item is never split)."""
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be positive (got {max_count}, {max_bytes})")
    shards: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    size = 0
    for item in items:
        if current and (len(current) >= max_count or size + item.est_bytes > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.est_bytes
    if current:
        shards.append(current)
    return shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: byte-identical re-runs
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str, items: list[SourceItem]) -> dict[str, Any]:
    """Write one shard whole or not at all (:func:`vpd_ray.atomic.atomic_path`), return its manifest record."""
    missing, count = [], 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for item in items:
            try:
                fields = item.load()
            except UnreadableSourceError as err:
                missing.append({"key": item.key, "source": item.source, "reason": str(err)})
                continue
            for ext in sorted(fields):
                add_member(tar, f"{item.key}.{ext}", fields[ext])
            count += 1
    return shard_record(path, count, missing)


def shard_record(path: str, count: int, missing: list[dict]) -> dict[str, Any]:
    return {"name": os.path.basename(path), "count": count, "bytes": os.path.getsize(path),
            "sha256": _sha256(path), "missing": missing}


def existing_shard_record(path: str, items: list[SourceItem]) -> dict[str, Any]:
    """Manifest record of a shard finished by an earlier run, checked against this run's plan."""
    planned = {item.key: item for item in items}
    keys = [key for key, _ in iter_raw_samples(path)]
    stray = [key for key in keys if key not in planned]
    present = set(keys)
    if stray or keys != [key for key in planned if key in present]:
        what = (f"keys this conversion would not put there (e.g. {stray[0]})" if stray
                else "this conversion's keys in another order")
        raise ConversionError(f"{path} holds {what}: it was written with other options or sources; delete the "
                              "output folder or use the same options")
    missing = [{"key": k, "source": it.source, "reason": _absence_reason(it, path)}
               for k, it in planned.items() if k not in present]
    return shard_record(path, len(keys), missing)


def _absence_reason(item: SourceItem, path: str) -> str:
    """Why a planned sample is not in a completed shard: its source is re-checked (absences are rare)."""
    try:
        item.load()
    except UnreadableSourceError as err:
        return str(err)
    return f"readable now but absent from {os.path.basename(path)}, completed earlier: delete that shard to add it"


def _write_job(job: tuple[str, list[SourceItem]]) -> tuple[str, dict[str, Any]]:
    path, items = job
    return path, write_shard(path, items)


def write_shards(items: list[SourceItem], out_dir: str, prefix: str, *, max_count: int = 1000,
                 max_bytes: int = 1 << 30, workers: int = 1, max_missing: float = 0.01,
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert ``items`` into shards under ``out_dir``; returns the manifest (also written as JSON)."""
    from vpd_ray.progress import progress

    if not items:
        raise ConversionError(f"nothing to convert for {prefix}: the source list is empty")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConversionError(f"two sources map to the same key {dup!r}")
    os.makedirs(out_dir, exist_ok=True)
    remove_temporaries(out_dir, f"{prefix}-", ".tar")
    plan = plan_shards(items, max_count, max_bytes)
    paths = [os.path.join(out_dir, shard_name(prefix, i)) for i in range(len(plan))]
    records: dict[str, dict] = {}
    todo = []
    for path, group in zip(paths, plan):
        if os.path.exists(path):
            records[path] = existing_shard_record(path, group)
        else:
            todo.append((path, group))
    options = dict(max_count=max_count, max_bytes=max_bytes)
    manifest_file = manifest_path(out_dir, prefix)
    write_json_atomic(manifest_file, manifest_of(list(records.values()), prefix, info, options, failure=IN_PROGRESS))
    done = sum(len(group) for path, group in zip(paths, plan) if path in records)
    with progress(len(items), prefix, unit="sample", initial=done) as bar:
        for path, record in _run_jobs(todo, workers):
            records[path] = record
            bar.update(record["count"] + len(record["missing"]))
    ordered = [records[p] for p in paths]
    failure = _limit_failure(ordered, len(items), max_missing)
    manifest = manifest_of(ordered, prefix, info, options, failure)
    write_json_atomic(manifest_file, manifest)
    if failure:
        raise ConversionError(f"{failure}; they are listed in {manifest_file}")
    return manifest


def _limit_failure(records: list[dict], total: int, max_missing: float) -> str | None:
    """Why shards with these records fail the conversion's limits, None when they pass.

    Over ``max_missing`` fails; so does every source missing whatever the limit, since a wrong
    ``--root`` reads as exactly that and shards without a sample are no dataset. The first reason
    is quoted because it usually tells which (a wrong folder, a corrupt file).
    """
    missing = [m for r in records for m in r["missing"]]
    share = len(missing) / total
    if share > max_missing:
        what = f"more than max_missing={max_missing:.1%}"
    elif len(missing) == total:
        what = "no sample is left"
    else:
        return None
    return (f"{len(missing)} of {total} sources ({share:.1%}) are missing or unreadable, {what}; "
            f"first: {missing[0]['reason']}")


def _run_jobs(todo: list[tuple[str, list[SourceItem]]], workers: int):
    """``(path, record)`` of each written shard as it completes, from ``workers`` processes."""
    if workers <= 1 or len(todo) <= 1:
        yield from map(_write_job, todo)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
        yield from pool.imap_unordered(_write_job, todo)


def manifest_of(records: list[dict], prefix: str, info: dict | None, options: dict,
              failure: str | None) -> dict[str, Any]:
    """The manifest of ``records``; with a ``failure``, marked incomplete for that reason."""
    missing = [m for r in records for m in r["missing"]]
    shards = [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in records]
    status = {"complete": False, "reason": failure} if failure else {"complete": True}
    return {"format": MANIFEST_FORMAT, "prefix": prefix, **(info or {}), "options": options, **status,
            "num_samples": sum(s["count"] for s in shards), "num_missing": len(missing),
            "shards": shards, "missing": missing}


def write_json_atomic(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())
