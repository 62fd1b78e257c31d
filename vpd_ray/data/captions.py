"""Caption shards: every sample of a shard set with a caption added (EVP / TADP's per-image text).

Layout: ``python -m vpd_ray.captions SHARDS --model CAPTIONER --out DIR`` writes, for each source shard
``<prefix>-NNNNNN.tar``, ``DIR/<prefix>-NNNNNN.tar``: the same samples, keys and order, every member
byte for byte as it was, plus one ``<key>.txt`` member (the caption, UTF-8), and
``DIR/<prefix>.manifest.json`` (the source manifest's dataset keys, the counts and sha256 of the new
shards, ``captions``: the model and the source). Training points ``tasks.<name>.train_shards`` at
``DIR`` and sets ``context: caption``.

Why whole shards and not caption-only side shards read alongside the image shards: a sample stays
one tar member group, so nothing downstream changes (the stream's split rule and counts, the decode
whitelist, which gains one field, the config's path checks, inference sources, benchmarks), and no
reader has to keep two tars in step or handle a caption shard missing, stale or cut short next to
its image shard. The price is a second copy of the images on disk.

Resumable like the other writers (:mod:`vpd_ray.data.writer`): a shard is written to a temporary
name and renamed into place when complete, so an existing ``DIR/<name>.tar`` is finished and is
skipped on a re-run (after checking it holds its source's keys, in order; else the run stops: it was
written from other shards). The manifests say ``"complete": false`` from the start until every shard
of their prefix is written, so the stream refuses a half-captioned set.

The job: the shards to caption are rows of a Ray Data dataset mapped by an actor pool
(:class:`ShardCaptioner`: one GPU each where the cluster has GPUs, else CPUs), each actor loading
the captioning model once (``transformers``' ``AutoModelForImageTextToText`` + ``AutoProcessor``
from a local folder: BLIP, BLIP-2, GIT) and captioning one whole shard per call, in batches. The
driver streams the finished shards back, shows progress and writes the manifests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
import tarfile
from typing import Any, TextIO

from vpd_ray.atomic import atomic_path, remove_temporaries
from vpd_ray.data.decode import check_fields, decode_sample, wanted_extensions
from vpd_ray.data.tario import (
    MANIFEST_SUFFIX,
    expand_urls,
    is_local,
    local_path,
    open_url,
    read_json,
    read_manifest,
    split_name,
)
from vpd_ray.data.writer import (
    IN_PROGRESS,
    ConversionError,
    add_member,
    manifest_of,
    shard_record,
    write_json_atomic,
)
from vpd_ray.errors import DataError, first_line

CAPTION_EXT = "txt"
# Keys of a source manifest that describe the dataset (copied into the caption manifest); the rest
# (counts, shards, status) describe the source's own files.
_OWN_KEYS = ("format", "prefix", "options", "complete", "reason", "num_samples", "num_missing", "shards", "missing")
WRITTEN, SKIPPED, REFUSED = "written", "skipped", "refused"


class Captioner:
    """What captions a batch: ``fields`` (the shard fields it reads and needs; None: every field a
    sample has), ``__call__(samples) -> captions`` (decoded samples in, one str each out)."""

    fields: tuple[str, ...] | None = ("jpg", "jpeg", "png")

    def __call__(self, samples: list[dict[str, Any]]) -> list[str]:
        raise NotImplementedError


class ModelCaptioner(Captioner):
    """A transformers image-to-text model (BLIP, BLIP-2, GIT: ``AutoModelForImageTextToText``) and its
    ``AutoProcessor`` from ``path``, greedy decoding of at most ``max_new_tokens`` tokens."""

    def __init__(self, path: str, device: str | None = None, max_new_tokens: int = 30):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars, one per actor, in the job's console
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> list[str]:
        import torch

        inputs = self.processor(images=[s["image"] for s in samples], return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(text.split()) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def check_captioner(path: str) -> None:
    """The driver's check of ``--model`` before any actor starts: a local folder whose config is an
    image-to-text model transformers knows, and whose processor loads. ValueError, one line."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as KNOWN,
    )

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path!r}: not a local transformers model folder (no config.json); save the "
                         "captioner with save_pretrained (model and processor) first")
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type not in KNOWN:
            raise ValueError(f"a {model_type!r} model is no image-to-text model (BLIP, BLIP-2, GIT, ...)")
        AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"--model {path!r}: cannot load a captioner: {first_line(err)}") from None


# --- one shard ------------------------------------------------------------------------------------

def caption_shard(src: str, dst: str, captioner: Captioner, batch_size: int = 16) -> dict[str, Any]:
    """Write ``dst``: every sample of ``src`` as it is plus its ``txt`` caption (replacing one it had).

    Returns the manifest record (name, count, bytes, sha256) plus ``uncaptioned``: samples whose image
    did not decode, copied without a caption (training counts them corrupt, as it would have). A field
    outside the decode whitelist raises ForbiddenFieldError before ``dst`` exists.
    """
    from vpd_ray.data.decode import CorruptSampleError
    from vpd_ray.data.tario import iter_raw_samples

    wanted = wanted_extensions(captioner.fields)
    count, uncaptioned = 0, []
    with atomic_path(dst) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            batch: list[tuple[str, dict[str, bytes], dict[str, Any] | None]] = []

            def flush() -> None:
                decoded = [sample for _, _, sample in batch if sample is not None]
                captions = iter(captioner(decoded) if decoded else [])
                for key, fields, sample in batch:
                    out = {ext: data for ext, data in fields.items() if ext != CAPTION_EXT}
                    if sample is not None:
                        out[CAPTION_EXT] = next(captions).encode("utf-8")
                    for ext in sorted(out):  # the writers' member order
                        add_member(tar, f"{key}.{ext}", out[ext])
                batch.clear()

            for key, fields in iter_raw_samples(src):
                check_fields(fields, key, src)
                try:
                    sample = decode_sample(fields, key, src, wanted)
                except CorruptSampleError as err:
                    uncaptioned.append({"shard": os.path.basename(dst), "key": key, "reason": str(err)})
                    sample = None
                batch.append((key, fields, sample))
                count += 1
                if len(batch) >= batch_size:
                    flush()
            flush()
    return {**shard_record(dst, count, []), "uncaptioned": uncaptioned}


def shard_keys(url: str) -> list[str]:
    """A shard's sample keys in tar order, from its member headers."""
    with open_url(url) as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        names = [split_name(m.name)[0] for m in tar if m.isfile()]
    return [k for i, k in enumerate(names) if i == 0 or names[i - 1] != k]


# --- the plan: which shards, where, which are done ------------------------------------------------

@dataclasses.dataclass
class CaptionJob:
    src: str
    dst: str
    prefix: str
    count: int  # samples (from the source manifest, else a header scan)


@dataclasses.dataclass
class CaptionPlan:
    """Every shard's job, the records of the ones finished earlier, and per prefix its source manifest."""

    out: str
    jobs: list[CaptionJob]
    done: dict[str, dict[str, Any]]  # dst -> record
    sources: dict[str, dict | None]  # prefix -> the source manifest
    info: dict[str, Any]  # captions: model and options, for the manifests

    @property
    def todo(self) -> list[CaptionJob]:
        return [job for job in self.jobs if job.dst not in self.done]


def _prefix(url: str) -> str:
    return posixpath.basename(url).rsplit("-", 1)[0]


def plan_captions(shards: str, out: str, info: dict[str, Any]) -> CaptionPlan:
    """Resolve ``shards`` (brace pattern, comma list, folder) against ``out``.

    Raises ValueError for shards that name nothing or are not there, or an ``out`` that would write over
    them; DataError for a source conversion its manifest marks incomplete; ConversionError for a shard
    in ``out`` that does not hold its source's keys in order (written from other shards).
    """
    from vpd_ray.data.tario import shard_counts

    urls = expand_urls(shards)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        raise ValueError(f"shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
    counts = shard_counts(urls)  # DataError for an incomplete source conversion
    out = os.path.abspath(out)
    jobs = [CaptionJob(u, os.path.join(out, posixpath.basename(u)), _prefix(u), c) for u, c in zip(urls, counts)]
    names = [posixpath.basename(u) for u in urls]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two shards are named {dup}: caption them into separate --out folders")
    clash = [j.src for j in jobs if is_local(j.src) and os.path.abspath(local_path(j.src)) == j.dst]
    if clash:
        raise ValueError(f"--out {out} is the shards' own folder: captioned shards would replace {clash[0]}; "
                         "give another folder")
    os.makedirs(out, exist_ok=True)
    remove_temporaries(out, suffix=".tar")
    sources = {job.prefix: read_manifest(job.src) for job in jobs}
    done = {}
    for job in jobs:
        if os.path.exists(job.dst):
            keys = shard_keys(job.dst)
            if keys != shard_keys(job.src):
                raise ConversionError(f"{job.dst} does not hold the samples of {job.src} in order: it was written "
                                      "from other shards; delete it or use another --out folder")
            earlier = read_json(os.path.join(out, job.prefix + MANIFEST_SUFFIX)) or {}
            listed = earlier.get("captions", {}).get("uncaptioned", [])
            name = os.path.basename(job.dst)
            done[job.dst] = {**shard_record(job.dst, len(keys), []),
                             "uncaptioned": [u for u in listed if u.get("shard") == name]}
    return CaptionPlan(out, jobs, done, sources, info)


def write_manifests(plan: CaptionPlan, records: dict[str, dict[str, Any]], failure: str | None = None) -> None:
    """``<out>/<prefix>.manifest.json`` per prefix: complete when each of its shards has a record and
    no ``failure``; ``records``: dst -> record of every shard written so far (this run and earlier)."""
    for prefix, source in plan.sources.items():
        jobs = [job for job in plan.jobs if job.prefix == prefix]
        have = [records[job.dst] for job in jobs if job.dst in records]
        reason = failure or (None if len(have) == len(jobs) else IN_PROGRESS)
        dataset = {k: v for k, v in (source or {}).items() if k not in _OWN_KEYS}
        uncaptioned = [u for r in have for u in r.get("uncaptioned", [])]
        info = {**dataset, "captions": {**plan.info, "field": CAPTION_EXT, "num_uncaptioned": len(uncaptioned),
                                        "uncaptioned": uncaptioned}}
        manifest = manifest_of([{k: r[k] for k in ("name", "count", "bytes", "sha256", "missing")} for r in have],
                             prefix, info, {}, reason)
        write_json_atomic(os.path.join(plan.out, prefix + MANIFEST_SUFFIX), manifest)


def caption_shards(shards: str, out: str, captioner: Captioner, batch_size: int = 16,
                   info: dict[str, Any] | None = None) -> CaptionPlan:
    """The job in this process, shard after shard (tests, the synthetic captioner): same files as
    :func:`run_caption_job`."""
    plan = plan_captions(shards, out, info or {"model": type(captioner).__name__})
    records = dict(plan.done)
    write_manifests(plan, records)
    for job in plan.todo:
        records[job.dst] = caption_shard(job.src, job.dst, captioner, batch_size)
    write_manifests(plan, records)
    return plan


# --- the Ray Data job -----------------------------------------------------------------------------

@dataclasses.dataclass
class CaptionOptions:
    """Options of ``python -m vpd_ray.captions`` (field names are the CLI flags)."""

    shards: str
    model: str
    out: str
    batch_size: int = 16  # images per generate call
    max_new_tokens: int = 30
    concurrency: int | None = None  # actors; default: one per GPU, else one
    num_cpus_per_actor: float = 1.0


@dataclasses.dataclass
class CaptionSummary:
    shards: int
    written: int  # shards captioned by this run
    skipped: int  # shards finished by an earlier run
    samples: int  # samples in the written shards
    uncaptioned: int  # of them, samples whose image did not decode (copied without a caption)
    seconds: float

    def line(self, out: str) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        note = f", {self.uncaptioned} without a caption (image unreadable: listed in the manifest)" if self.uncaptioned else ""
        return (f"captions: {self.shards} shards, {self.written} written, {self.skipped} skipped (existing), "
                f"{self.samples} samples{note}, {self.seconds:.1f} s, {rate:.2f} samples/s -> {out}")


class ShardCaptioner:
    """The Ray Data actor: loads the captioner once; each call captions the shards of its rows."""

    def __init__(self, model: str, batch_size: int, max_new_tokens: int):
        self.captioner = ModelCaptioner(model, max_new_tokens=max_new_tokens)
        self.batch_size = batch_size

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"dst": [], "status": [], "error": [], "record": []}
        for src, dst in zip(rows["src"], rows["dst"]):
            try:
                record, status, error = caption_shard(str(src), str(dst), self.captioner, self.batch_size), WRITTEN, ""
            except DataError as err:  # a forbidden field: the same shard fails the same way, so stop the job
                record, status, error = {}, REFUSED, str(err)
            out["dst"].append(str(dst))
            out["status"].append(status)
            out["error"].append(error)
            out["record"].append(json.dumps(record))
        return out


def _actor_resources(concurrency: int | None, num_cpus: float) -> dict[str, Any]:
    """One GPU per actor where the cluster has GPUs, CPUs otherwise (as batch inference)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"compute": ActorPoolStrategy(size=concurrency or gpus), "num_gpus": 1}
    return {"compute": ActorPoolStrategy(size=concurrency or 1), "num_cpus": num_cpus}


def caption_info(opts: CaptionOptions) -> dict[str, Any]:
    """What the manifests say about the captions: the model folder and the decoding length."""
    return {"model": os.path.abspath(opts.model), "max_new_tokens": opts.max_new_tokens}


def run_caption_job(opts: CaptionOptions, stream: TextIO = sys.stderr, plan: CaptionPlan | None = None) -> CaptionSummary:
    """Caption ``opts.shards`` into ``opts.out`` on the connected Ray cluster (see the module docstring);
    ``plan``: :func:`plan_captions` of the same options, made already (the entry point checks with it).

    Raises ValueError / DataError / ConversionError (from :func:`plan_captions`) before any actor
    starts, and DataError when a shard is refused (after the manifests are written, incomplete).
    """
    import time

    import ray.data

    from vpd_ray.progress import progress

    start = time.perf_counter()
    plan = plan or plan_captions(opts.shards, opts.out, caption_info(opts))
    records = dict(plan.done)
    write_manifests(plan, records)
    todo = plan.todo
    counts = {job.dst: job.count for job in plan.jobs}
    written, samples, uncaptioned, refusal = 0, 0, 0, ""
    total = sum(counts.values())
    with progress(total, "captions", unit="sample", initial=total - sum(j.count for j in todo), stream=stream) as bar:
        if todo:
            dataset = ray.data.from_items([{"src": job.src, "dst": job.dst} for job in todo]).map_batches(
                ShardCaptioner,
                fn_constructor_kwargs={"model": opts.model, "batch_size": opts.batch_size,
                                       "max_new_tokens": opts.max_new_tokens},
                batch_size=1,
                batch_format="numpy",
                **_actor_resources(opts.concurrency, opts.num_cpus_per_actor),
            )
            for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for dst, status, error, record in zip(rows["dst"], rows["status"], rows["error"], rows["record"]):
                    if status == REFUSED:
                        refusal = refusal or str(error)
                        continue
                    record = json.loads(str(record))
                    records[str(dst)] = record
                    written, samples = written + 1, samples + record["count"]
                    uncaptioned += len(record["uncaptioned"])
                    bar.update(record["count"])
                write_manifests(plan, records)  # a killed driver leaves the finished shards listed
                if refusal:
                    break
    write_manifests(plan, records, failure=f"a shard was refused: {refusal}" if refusal else None)
    if refusal:
        raise DataError(refusal)
    return CaptionSummary(len(plan.jobs), written, len(plan.done), samples, uncaptioned, time.perf_counter() - start)

