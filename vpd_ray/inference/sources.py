"""What to run inference on: a folder, a glob, webdataset shards, or a JSONL of (image, sentence).

``resolve_input`` turns the ``--input`` string into an :class:`InferenceInput` on the driver,
without reading any image: file lists are known up front, so outputs that already exist are
filtered out before Ray reads a byte (a crashed job re-runs cheaply). ``build_dataset`` then makes
the Ray Data dataset the predictor actors consume.

Output names mirror input names: ``DIR/sub/img.jpg`` under ``--input DIR`` becomes
``OUT/sub/img.png``; a shard sample becomes ``OUT/<__key__>.png``; the n-th (0-based) line of a
referring JSONL becomes ``OUT/<image name>__<id or n>.png``.

Shards are read as training reads them (:mod:`vpd_ray.data.tario`, the decode whitelist), with
the read's verdicts as rows: a shard with a field outside the whitelist, or one its manifest marks
incomplete, is one ``refused`` row (nothing of it is predicted or written; the driver stops the
job), a cut shard is its samples before the cut plus one ``failed`` row naming it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpd_ray.data import decode, tario
from vpd_ray.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Shard fields an inference job reads, once the whole shard passed the whitelist: the image and its
# metadata. Labels and masks stay in the read task.
SHARD_FIELDS = ("jpg", "jpeg", "png", "json")
OUTPUT_SUFFIX = ".png"
# Row statuses. The shard read's own verdicts (FAILED: a sample it could not read; REFUSED: a shard
# with a field outside the whitelist, or an incomplete conversion) pass through the predictor, which
# adds the other outcomes.
WRITTEN, SKIPPED, FAILED, REFUSED = "written", "skipped", "failed", "refused"


@dataclasses.dataclass
class InferenceInput:
    """The resolved ``--input``.

    ``kind`` is ``"files"`` (``paths`` with ``root``), ``"pairs"`` (``pairs``: dicts with
    ``path``, ``name``, ``sentence``) or ``"shards"`` (``urls``).
    """

    kind: str
    root: str = ""
    paths: list[str] = dataclasses.field(default_factory=list)
    pairs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    urls: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) + len(self.pairs) + len(self.urls)


def output_name(path: str, root: str) -> str:
    """The output name (no suffix) of an input file: its path relative to ``root``, minus extension."""
    return os.path.splitext(os.path.relpath(path, root))[0]


def output_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}{OUTPUT_SUFFIX}"


def _is_shard_spec(spec: str) -> bool:
    return spec.endswith(".tar") or spec.endswith(".tar}") or (".tar" in spec and "{" in spec)


def _expand_shards(spec: str) -> list[str]:
    """Brace patterns (``nyu-{000..007}.tar``), comma lists and globs -> existing shard files."""
    from vpd_ray.data.tario import expand_urls

    urls: list[str] = []
    for pattern in expand_urls(spec):
        urls.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:5])}")
    refusal = tario.incomplete_reason(urls)  # training's refusal, before any actor loads the model
    if refusal:
        raise DataError(refusal)
    return urls


def _list_images(spec: str) -> tuple[str, list[str]]:
    """A folder (searched recursively), a glob or one file -> (root for output names, sorted paths)."""
    if os.path.isdir(spec):
        root = spec
        paths = [str(p) for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    elif glob.has_magic(spec):
        magic_at = min(i for i, c in enumerate(spec) if c in "*?[")
        root = os.path.dirname(spec[:magic_at]) or "."
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(spec):
        root, paths = os.path.dirname(spec) or ".", [spec]
    else:
        raise FileNotFoundError(f"--input {spec!r} is neither a folder, a glob, a shard pattern nor a file")
    if not paths:
        raise FileNotFoundError(f"--input {spec!r} matches no image ({', '.join(IMAGE_EXTENSIONS)})")
    return root, sorted(paths)


def _check_unique_names(names: list[str], sources: list[str]) -> None:
    """Two inputs must never write one output (``a.jpg`` and ``a.png`` side by side would)."""
    seen: dict[str, str] = {}
    for name, source in zip(names, sources):
        if name in seen:
            raise ValueError(f"{seen[name]} and {source} would both write {name}{OUTPUT_SUFFIX}")
        seen[name] = source


def _read_pairs(jsonl: str) -> list[dict[str, Any]]:
    """Referring pairs: one JSON object per line with ``image`` (relative to the JSONL's folder or
    absolute), ``sentence`` and an optional ``id`` that names the output."""
    base = os.path.dirname(jsonl) or "."
    pairs = []
    with open(jsonl, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image, sentence = entry["image"], entry["sentence"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                expected = '{"image": ..., "sentence": ...}'
                raise ValueError(f"{jsonl}:{index + 1}: expected {expected} ({err})") from None
            path = os.path.join(base, image)
            name = f"{os.path.splitext(image)[0]}__{entry.get('id', index)}"
            pairs.append({"path": path, "name": name, "sentence": str(sentence)})
    if not pairs:
        raise ValueError(f"{jsonl} holds no (image, sentence) pair")
    return pairs


def resolve_input(spec: str) -> InferenceInput:
    """Parse ``--input``; raises FileNotFoundError / ValueError / DataError naming the bad value."""
    if spec.endswith(".jsonl"):
        pairs = _read_pairs(spec)
        _check_unique_names([p["name"] for p in pairs], [p["path"] for p in pairs])
        return InferenceInput("pairs", root=os.path.dirname(spec) or ".", pairs=pairs)
    if _is_shard_spec(spec):
        return InferenceInput("shards", urls=_expand_shards(spec))
    root, paths = _list_images(spec)
    _check_unique_names([output_name(p, root) for p in paths], paths)
    return InferenceInput("files", root=root, paths=paths)


def drop_existing(source: InferenceInput, output_dir: str | Path) -> tuple[InferenceInput, int]:
    """Remove inputs whose output exists; returns the rest and how many were dropped.

    Shard samples are only known once read, so the predictor checks those itself.
    """
    if source.kind == "files":
        keep = [p for p in source.paths if not output_path(output_dir, output_name(p, source.root)).exists()]
        return dataclasses.replace(source, paths=keep), len(source.paths) - len(keep)
    if source.kind == "pairs":
        keep = [p for p in source.pairs if not output_path(output_dir, p["name"]).exists()]
        return dataclasses.replace(source, pairs=keep), len(source.pairs) - len(keep)
    return source, 0


def check_shard_fields(url: str) -> None:
    """Raise decode's ForbiddenFieldError for the first sample of shard ``url`` with a field outside
    the whitelist, the message training gives. Reads member headers only (tar mode ``r:`` seeks over
    the data); a cut or unreadable tar ends the scan, and the read that follows reports it."""
    fields: dict[str, set[str]] = {}  # key -> extensions, in tar order
    try:
        with tario.open_url(url) as fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = tario.split_name(member.name)
                    fields.setdefault(key, set()).add(ext)
    except (tarfile.ReadError, EOFError):
        pass
    for key, extensions in fields.items():
        decode.check_fields(extensions, key, url)


def shard_row(url: str, key: str, fields: dict[str, bytes] | None = None, status: str = "",
              error: str = "") -> dict[str, Any]:
    """One row of a shard read; ``status`` is "" for a sample to predict, else the read's verdict.

    Every row has every column, ``b""`` where the sample lacks the field and ``fields`` naming the
    ones it has: Ray Data turns a block's column of Nones into float NaNs. :func:`present_fields`
    undoes this.
    """
    fields = {ext: data for ext, data in (fields or {}).items() if ext in SHARD_FIELDS}
    return {"__url__": url, "__key__": key, "status": status, "error": error, "fields": ",".join(fields),
            **{ext: fields.get(ext, b"") for ext in SHARD_FIELDS}}


def present_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A shard row with only the fields its sample has (:func:`shard_row`); other rows unchanged."""
    if "fields" not in row:
        return row
    present = set(str(row["fields"]).split(","))
    return {name: value for name, value in row.items() if name not in SHARD_FIELDS or name in present}


def read_shard(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``flat_map`` of ``{"url": shard}``: the whitelist check of the whole shard, then its samples
    (see the module docstring for the refused and failed rows)."""
    url = item["url"]
    try:
        check_shard_fields(url)
        # The manifest's count (where there is one) tells a cut on a member boundary, as in training;
        # shard_counts refuses a shard its manifest marks incomplete.
        take = tario.shard_counts([url])[0] if tario.read_manifest(url) else None
    except DataError as err:
        yield shard_row(url, "", status=REFUSED, error=str(err))
        return
    try:
        for key, fields in tario.iter_raw_samples(url, take=take):
            yield shard_row(url, key, fields)
    except tario.TruncatedShardError as err:
        yield shard_row(url, "", status=FAILED, error=f"TruncatedShardError: {err}")


def build_dataset(source: InferenceInput, blocks: int | None = None):
    """The Ray Data dataset of raw inputs (image bytes are decoded by the predictor, never here).

    Rows: ``files`` -> ``bytes``, ``path``; ``pairs`` -> ``path``, ``name``, ``sentence`` (the
    predictor reads the image, so one image shared by many sentences is no special case);
    ``shards`` -> :func:`shard_row`'s, one read task per shard.
    """
    import ray.data

    # Reads only move bytes (decoding happens in the actors, which hold the CPUs/GPUs), so they take
    # no CPU slot: on a CPU-only cluster a read holding a CPU that the actor pool waits for deadlocks.
    if source.kind == "files":
        return ray.data.read_binary_files(source.paths, include_paths=True, override_num_blocks=blocks, num_cpus=0)
    if source.kind == "pairs":
        return ray.data.from_items(source.pairs, override_num_blocks=blocks)
    urls = ray.data.from_items([{"url": url} for url in source.urls], override_num_blocks=blocks or len(source.urls))
    return urls.flat_map(read_shard, num_cpus=0)
