"""Reading webdataset tar shards: URL expansion, opening any fsspec URL, raw sample grouping.

A webdataset shard is a plain tar whose members are named ``<key>.<ext>``; consecutive members
with the same key form one sample. Everything here deals in raw bytes: decoding (and the
whitelist that keeps pickles out) lives in :mod:`vpd_ray.data.decode`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO

MANIFEST_SUFFIX = ".manifest.json"  # <prefix>.manifest.json beside <prefix>-000000.tar ...


class TruncatedShardError(Exception):
    """The tar ended inside a member (an interrupted copy or a cut download)."""


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern, a comma list, a list, or a local directory of ``*.tar``.

    ``"data/depth-train-{000000..000003}.tar,s3://bucket/x.tar"`` -> five URLs, in order.
    """
    from braceexpand import braceexpand

    parts = spec if isinstance(spec, list) else [p for p in spec.split(",") if p.strip()]
    urls: list[str] = []
    for part in parts:
        for url in braceexpand(part.strip()):
            if is_local(url) and os.path.isdir(local_path(url)):
                urls += sorted(os.path.join(url, n) for n in os.listdir(local_path(url)) if n.endswith(".tar"))
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    return urls


def is_local(url: str) -> bool:
    """A path on a machine's filesystem (``file://`` included), not s3://, gs://, pipe:..."""
    return ("://" not in url and not url.startswith("pipe:")) or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_url(url: str) -> IO[bytes]:
    """A binary file object for a local path or any URL fsspec knows (s3://, gs://, http://...)."""
    if is_local(url):
        return open(local_path(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def split_name(name: str) -> tuple[str, str]:
    """``"dir/abc.depth.png"`` -> ``("dir/abc", "depth.png")``: the key ends at the basename's first dot."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return posixpath.join(dirname, stem) if dirname else stem, ext


def iter_raw_samples(url: str, skip: int = 0, take: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for samples ``skip .. skip+take`` of one shard, in tar order.

    Members of skipped samples are stepped over without reading their data. Raises
    :class:`TruncatedShardError` when the tar ends inside a member or, with ``take`` given,
    before ``skip + take`` samples; the samples before it have been yielded, the incomplete one
    has not.
    """
    if take is not None and take <= 0:
        return
    index, key, fields = -1, None, {}
    with open_url(url) as fileobj:
        try:
            with tarfile.open(fileobj=fileobj, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    mkey, ext = split_name(member.name)
                    if mkey != key:
                        if key is not None and index >= skip:
                            yield key, fields
                            if take is not None and index + 1 >= skip + take:
                                return
                        index, key, fields = index + 1, mkey, {}
                    if index >= skip:
                        data = tar.extractfile(member).read()
                        if len(data) != member.size:
                            raise TruncatedShardError(f"{url}: member {member.name} is truncated")
                        fields[ext] = data
        except (tarfile.ReadError, EOFError) as err:
            raise TruncatedShardError(f"{url}: tar ends inside sample {index} ({key}): {err}") from None
    if take is not None and index + 1 < skip + take:
        # tarfile ends quietly when a cut falls on a header; only the expected count tells, and
        # then the last sample may be missing members, so it is dropped too.
        raise TruncatedShardError(f"{url}: tar ends after {index + 1} samples, {skip + take} expected; "
                                  f"dropped the last one ({key}) as possibly incomplete")
    if key is not None and index >= skip:
        yield key, fields


def count_samples(url: str) -> int:
    """Number of samples in a shard, by scanning its member headers."""
    with open_url(url) as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        keys = [split_name(m.name)[0] for m in tar if m.isfile()]
    return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


def read_manifest(url: str) -> dict | None:
    """The manifest a shard was written with (``<prefix>.manifest.json`` beside it), or None."""
    directory, name = posixpath.split(url)
    prefix = name.rsplit("-", 1)[0]
    path = posixpath.join(directory, prefix + MANIFEST_SUFFIX) if directory else prefix + MANIFEST_SUFFIX
    try:
        with open_url(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def shard_counts(urls: list[str]) -> list[int]:
    """Sample count of every shard: from its manifest where there is one, else by a header scan."""
    manifests: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        directory, name = posixpath.split(url)
        group = posixpath.join(directory, name.rsplit("-", 1)[0])
        if group not in manifests:
            manifest = read_manifest(url)
            manifests[group] = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
        known = manifests[group].get(name)
        counts.append(known if known is not None else count_samples(url))
    return counts
