"""Which config values name files or hub repositories, and checking that they are there.

A cluster's driver runs on the head node, which often does not mount the data (``/data``) that the
GPU nodes see, and cannot see inside ``s3://`` at all. So each path check is a small value
(:class:`PathCheck`) that can run on the driver or, for paths the driver cannot see, inside one Ray
task on a worker node (:mod:`vpd_ray.preflight`), with the same one-line message either way.

Hub ids (``owner/name``) are checked too: present in the local Hugging Face cache, or the hub
answers. With ``HF_HUB_OFFLINE=1`` and nothing cached, the run would fail on every worker after
Ray started, so it is an error here (``python -m vpd_ray.download`` fills a cache first).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

from vpd_ray.data.tario import expand_urls, incomplete_reason, is_local, local_path
from vpd_ray.errors import first_line

WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
SHARD_KEYS = ("train_shards", "val_shards", "test_shards")
HUB_TIMEOUT_S = 10
# ``remote`` prefixes that mark every path: for processes that must not re-check what the launch
# checked already (Tune trials may run on a head node that does not mount the data).
EVERY_PATH = ("",)


@dataclasses.dataclass(frozen=True)
class PathCheck:
    key: str  # the config key, e.g. "tasks.depth.train_shards"
    kind: str  # "shards" (a brace pattern / comma list), "path" (must exist) or "weights" (path or hub id)
    value: str
    probe: str = "config.json"  # "weights": a file every copy of the repository has


def looks_like_hub_id(value: str) -> bool:
    """``owner/name``, and not a local folder of that name (diffusers and transformers prefer it too)."""
    if os.path.exists(os.path.expanduser(value)) or value.startswith(("/", ".", "~")) or value.count("/") != 1:
        return False
    return not value.endswith(WEIGHT_SUFFIXES)


def config_paths(cfg: Any, need: Iterable[str]) -> list[PathCheck]:
    """Every check a resolved config asks for: the ``need`` shard keys of each task, the backbone's
    weights, task options that name weight files, and task options marked ``metadata={"weights": ...}``."""
    import dataclasses as dc

    from vpd_ray.tasks import get_task

    checks = []
    backbone = cfg.model.backbone
    if backbone.source == "pretrained":
        checks.append(PathCheck("model.backbone.path", "weights", backbone.path, probe="model_index.json"))
    elif backbone.source == "single_file":
        checks.append(PathCheck("model.backbone.path", "path", backbone.path))
    if backbone.get("config_path"):
        checks.append(PathCheck("model.backbone.config_path", "path", backbone.config_path))
    for name, section in cfg.tasks.items():
        checks += [PathCheck(f"tasks.{name}.{key}", "shards", section[key]) for key in need]
        fields = {f.name: f for f in dc.fields(get_task(name).config_class)}
        for key, value in section.items():
            if not isinstance(value, str):
                continue
            builtin = fields[key].metadata.get("weights") if key in fields else None
            if builtin is not None and value not in builtin:
                checks.append(PathCheck(f"tasks.{name}.{key}", "weights", value))
            elif value.endswith(WEIGHT_SUFFIXES):
                checks.append(PathCheck(f"tasks.{name}.{key}", "path", value))
    return checks


def is_remote(check: PathCheck, prefixes: Iterable[str]) -> bool:
    """Checked on a worker node: cloud URLs always; local paths under one of ``prefixes`` ("" or "/":
    all of them, hub ids included, since the workers' Hugging Face cache is the one that counts)."""
    prefixes = [p.rstrip("/") for p in prefixes]
    if check.kind == "shards":
        try:
            urls = expand_urls(check.value)
        except ValueError:  # names nothing: checked (and refused) here
            return False
        return any(not is_local(u) or _under(u, prefixes) for u in urls)
    if check.kind == "weights" and looks_like_hub_id(check.value):
        return "" in prefixes
    return _under(check.value, prefixes)


def _under(path: str, prefixes: list[str]) -> bool:
    path = os.path.expanduser(path)
    return any(p == "" or path == p or path.startswith(p + "/") for p in prefixes)


def problem(check: PathCheck) -> str | None:
    """The one-line error of ``check`` on this machine, or None when it passes."""
    if check.kind == "shards":
        return _shards_problem(check)
    if check.kind == "weights" and looks_like_hub_id(check.value):
        found = _hub_problem(check.value, check.probe)
        return f"{check.key}: {found}" if found else None
    if not _exists(check.value):
        return f"{check.key}: path not found: {check.value}"
    return None


def problems(checks: Iterable[PathCheck]) -> list[str]:
    return [p for p in map(problem, checks) if p]


def _exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(os.path.expanduser(local_path(url)))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _shards_problem(check: PathCheck) -> str | None:
    if check.value is None:
        return f"{check.key}: required"
    try:
        urls = expand_urls(check.value)
    except ValueError:
        return f"{check.key}: {check.value!r} names no shards"
    try:
        missing = [u for u in urls if not _exists(u)]
    except (ImportError, ValueError, OSError) as err:  # no fsspec backend for the scheme, no credentials
        return f"{check.key}: cannot check {urls[0]}: {first_line(err)}"
    if missing:
        return f"{check.key}: {len(missing)} of {len(urls)} shards not found, first: {missing[0]}"
    incomplete = incomplete_reason(urls)  # a conversion that failed its limits: never read by accident
    return f"{check.key}: {incomplete}" if incomplete else None


def _hub_problem(repo_id: str, probe: str) -> str | None:
    """None when ``repo_id`` is in the local cache or the hub answers for it."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, probe), str):
        return None
    fetch = "fetch it once with `python -m vpd_ray.download CONFIG` into a cache the workers share, or give a local folder"
    if constants.is_offline_mode():
        return f"hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fetch}"
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except errors.RepositoryNotFoundError:
        return f"hub id {repo_id!r}: no such repository on the Hugging Face hub (or it needs a token)"
    except Exception as err:  # connection refused, DNS, timeout, HTTP 5xx: all mean "not reachable"
        return f"hub id {repo_id!r}: the Hugging Face hub is unreachable ({first_line(err)}); {fetch}"
    return None


def human_bytes(n: float) -> str:
    """``11.5 GiB``, ``623.9 MiB``: sizes in printed plans and checkpoint lines."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"
