"""``python -m vpd_ray.bench gpu``: the training step and inference at SD-1.5 scale on one GPU, printed
as markdown tables for docs/benchmarks.md; ``--cpu-smoke`` runs the same phases and code at tiny size.

Offline and without weights: the UNet and VAE are random, built from the SD v1-5 configs shipped in
``vpd_ray/model/sd15/`` and written as a diffusers folder that ``model.backbone.source=pretrained``
loads as it loads SD v1-5 (speed does not depend on the weights); the configs' class-embedding
files and CLIP text encoder are replaced by their built-in stand-ins (seeded random class vectors,
the 2-layer ``tiny`` CLIP at the UNet's 768-d context). The batches are synthetic and in memory.

Every phase runs in one Ray Train worker (:func:`vpd_ray.engine.train_job.torch_trainer`: NCCL on a
GPU, gloo on a CPU) with the product's trainer on the phase's config, the shipped config with one
override per speed option: ``configs/nyu.yaml`` (depth), ``configs/ade20k.yaml`` (seg) and
``configs/refcoco.yaml`` (refer). What the worker measures: :mod:`vpd_ray.benchmarks.gpu_worker`.

``--budget-s`` bounds the whole command: a phase that the longest one so far would carry past it
is printed as "skipped (budget)"; ``--phases`` runs a subset (e.g. the skipped ones, in a second run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
CONFIGS = {"depth": "nyu.yaml", "seg": "ade20k.yaml", "refer": "refcoco.yaml"}
# The files the configs name, replaced by their built-in stand-ins: the benchmark reads nothing but its configs.
OFFLINE = {"depth": ("tasks.depth.class_embeddings=null",), "seg": ("tasks.seg.class_embeddings=null",),
           "refer": ("tasks.refer.text_encoder=tiny", "tasks.refer.tokenizer=tiny")}
# --cpu-smoke: small crops and heads on the tiny backbone; everything else as configured.
SMOKE = {"depth": ("tasks.depth.crop_size=[64,64]", "tasks.depth.head_dim=16"),
         "seg": ("tasks.seg.crop_size=[64,64]", "tasks.seg.scale=[256,64]", "tasks.seg.neck_channels=16",
                 "tasks.seg.head_channels=8"),
         "refer": ("tasks.refer.image_size=64", "tasks.refer.decoder_hidden=16")}
COMPILE_ON_CPU = ("skipped on CPU: inductor compiles the UNet's forward and backward for minutes on 2 cores "
                  "(tests/test_speed.py checks the compiled UNet with aot_eager)")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # the row's first column and its --phases name
    task: str  # depth | seg | refer: the config is CONFIGS[task]
    kind: str = "train"  # train | search | infer | vae: gpu_worker.PHASES
    overrides: tuple[str, ...] = ()  # on top of the shipped config: the speed option it flips
    on_cpu: str = ""  # why --cpu-smoke prints this instead of running it ("": it runs)
    needs: str = ""  # a module a GPU run of it imports (not installed: the row says so instead)
    # seconds the budget expects it to take at least (else: as long as the longest phase so far)
    expected_s: float = 0.0


# In order of need (a tight budget skips the last), but inference first: on the backend flags `infer`
# runs with, PyTorch's defaults, before a trainer sets train.tf32 / train.cudnn_benchmark for the process.
PHASES = (
    Phase("depth-infer", "depth", "infer"),
    Phase("seg-infer", "seg", "infer"),
    Phase("refer-infer", "refer", "infer"),
    Phase("depth", "depth"),
    Phase("seg", "seg"),
    Phase("refer", "refer"),
    Phase("vae-error", "depth", "vae", overrides=("train.tf32=false",)),  # the reference: fp32 without TF32
    Phase("vae-bf16", "depth", overrides=("model.vae_dtype=bf16",)),
    Phase("channels-last", "depth", overrides=("train.channels_last=true",)),
    Phase("overlap-comm", "depth", overrides=("deepspeed.overlap_comm=true",)),
    Phase("jpeg-on-device", "depth", overrides=("data.jpeg_decode=device",), needs="torchvision"),  # nvJPEG
    Phase("tf32-off", "depth", overrides=("train.tf32=false",), on_cpu="n/a on CPU (a CUDA switch)"),
    Phase("cudnn-benchmark-off", "depth", overrides=("train.cudnn_benchmark=false",),
          on_cpu="n/a on CPU (a cuDNN switch)"),
    Phase("depth-max-batch", "depth", "search"),
    # inductor compiles the UNet's forward and backward first: minutes, whatever the phases before took
    Phase("compile", "depth", overrides=("train.compile=true",), on_cpu=COMPILE_ON_CPU, expected_s=180.0),
)
TABLES = {"train": "train", "search": "train", "infer": "infer", "vae": "vae"}


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of a run: SD-1.5 on a GPU, or the tiny smoke."""

    steps: int
    warmup: int
    instrumented: int
    max_batch: int


GPU = Scale(steps=5, warmup=2, instrumented=2, max_batch=64)
CPU_SMOKE = Scale(steps=2, warmup=1, instrumented=1, max_batch=4)


def not_run(phase: Phase, smoke: bool) -> str:
    """Why this run prints ``phase`` without running it ("": it runs)."""
    import importlib.util

    if smoke:
        return phase.on_cpu
    if phase.needs and importlib.util.find_spec(phase.needs) is None:
        return f"not run: {phase.needs} is not installed (install the build for this torch)"
    return ""


# --- setup ------------------------------------------------------------------------------------

def architecture(smoke: bool) -> dict[str, dict[str, Any]]:
    """The diffusers UNet and VAE configs: SD v1-5's shipped ones, or the tiny backbone's."""
    from vpd_ray.model.backbone import BackboneConfig, tiny_unet_config, tiny_vae_config
    from vpd_ray.plan import SD15_DIR

    if smoke:
        return {"unet": tiny_unet_config(BackboneConfig()), "vae": tiny_vae_config(BackboneConfig())}
    arch = {}
    for part in ("unet", "vae"):
        with open(os.path.join(SD15_DIR, f"{part}_config.json")) as f:
            arch[part] = json.load(f)
    return arch


def write_random_sd(root: str, arch: dict[str, dict[str, Any]], seed: int = 0) -> dict[str, int]:
    """A diffusers SD folder (``model_index.json``, ``unet/``, ``vae/``) of random weights with
    ``arch``'s shapes; returns the parameter counts of the UNet and of the VAE encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel.from_config(arch["unet"]), AutoencoderKL.from_config(arch["vae"])
    unet.save_pretrained(os.path.join(root, "unet"))
    vae.save_pretrained(os.path.join(root, "vae"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}, f)
    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    return {"unet": sum(p.numel() for p in unet.parameters()), "vae_encoder": sum(p.numel() for p in encoder)}


def phase_config(phase: Phase, sd_dir: str, storage: str, smoke: bool) -> Any:
    """The phase's shipped config on the random weights, one worker, no accumulation (one micro-batch
    per step), plus the phase's override; raises ConfigError."""
    from vpd_ray.config import load

    fixed = ["model.backbone.source=pretrained", f"model.backbone.path={sd_dir}", "scaling.num_workers=1",
             "train.global_batch_size=null", f"run.storage_path={storage}", f"scaling.use_gpu={not smoke}"]
    extra = SMOKE[phase.task] if smoke else ()
    path = os.path.join(CONFIG_DIR, CONFIGS[phase.task])
    return load(path, [*fixed, *OFFLINE[phase.task], *extra, *phase.overrides], need=())


# --- the run ----------------------------------------------------------------------------------

def run(smoke: bool, phases: list[Phase], budget_s: float, peak_tflops: float | None = None,
        num_cpus: int | None = None) -> tuple[str, list[str]]:
    """Every phase in one Ray Train worker (Ray is started here unless it is up): the markdown, and
    the tracebacks of the phases that failed. Raises ConfigError before anything starts."""
    import ray

    began = time.time()
    scale = CPU_SMOKE if smoke else GPU
    with tempfile.TemporaryDirectory(prefix="vpd_bench_gpu_") as tmp:
        arch = architecture(smoke)
        counts = write_random_sd(os.path.join(tmp, "sd"), arch)
        skipped = {p.name: why for p in phases if (why := not_run(p, smoke))}
        configs = {p.name: phase_config(p, os.path.join(tmp, "sd"), os.path.join(tmp, "runs"), smoke)
                   for p in phases if not p.needs or p.name not in skipped}  # else validation refuses it
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        runnable = [p for p in phases if p.name not in skipped]
        rows, failure = in_worker(runnable, configs, scale, began + budget_s, peak_tflops, tmp, smoke)
    rows.update({name: [{"status": why}] for name, why in skipped.items()})
    tracebacks = [row["traceback"] for p in phases for row in rows.get(p.name, []) if "traceback" in row]
    return render(phases, configs, rows, counts, arch, scale, smoke, time.time() - began, failure), tracebacks


def in_worker(phases: list[Phase], configs: dict[str, Any], scale: Scale, deadline: float,
              peak_tflops: float | None, tmp: str, smoke: bool) -> tuple[dict[str, Any], str]:
    """The phases in one Ray Train worker, its progress lines on the console: the rows it wrote, and
    a line if it died (the rows before that still count)."""
    from omegaconf import OmegaConf
    from ray.train import TrainingFailedError

    from vpd_ray.benchmarks.gpu_worker import worker
    from vpd_ray.engine.console import KEY, Console
    from vpd_ray.engine.train_job import torch_trainer
    from vpd_ray.errors import fault_line

    if not phases:  # all the ones asked for are phases the smoke prints without running
        return {"meta": {}}, ""
    base = configs[phases[0].name].copy()  # the worker's scaling and run storage
    if smoke:
        base.scaling.resources_per_worker = {"CPU": 1.0}
    rows_path, failure = os.path.join(tmp, "rows.jsonl"), ""
    with Console(tmp) as console:
        loop = {KEY: console.handle, "rows": rows_path, "deadline": deadline,
                "options": {**dataclasses.asdict(scale), "peak_tflops": peak_tflops},
                "phases": [{"name": p.name, "kind": p.kind, "expected_s": p.expected_s,
                            "config": OmegaConf.to_container(configs[p.name])} for p in phases]}
        try:
            torch_trainer(worker, loop, base, f"bench-gpu-{int(time.time())}", num_workers=1).fit()
        except TrainingFailedError as err:
            failure = f"the worker failed: {fault_line(err)}"
    return _read_rows(rows_path), failure


def _read_rows(path: str) -> dict[str, Any]:
    """``{"meta": {...}, phase name: [rows]}`` from the worker's rows file (missing: no rows came)."""
    rows: dict[str, Any] = {"meta": {}}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("table") == "meta":
                    rows["meta"] = row
                else:
                    rows.setdefault(row["phase"], []).append(row)
    return rows


# --- tables -----------------------------------------------------------------------------------

TRAIN_COLUMNS = ("phase", "what was run", "micro-batch", "timed steps", "s/step", "samples/s", "TFLOP/step", "MFU",
                 "peak alloc GiB", "peak reserved GiB", "data wait", "VAE encode ms", "UNet+head fwd+bwd ms",
                 "optimizer step ms", "device augment ms", "notes")
INFER_COLUMNS = ("phase", "what was run", "input", "dtype", "frames timed", "frames/s", "peak alloc GiB",
                 "peak reserved GiB")
VAE_COLUMNS = ("phase", "what was run", "latents, bf16 vs fp32 (relative L2)")


def _num(value: float | None, spec: str = ".3g", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def describe(cfg: Any, kind: str, text_dim: int) -> str:
    """What a row ran: the config and task with its sizes and context, and for training the engine and
    the speed options."""
    name, task = next(iter(cfg.tasks.items()))
    config = f"configs/{CONFIGS[name]}"
    if kind == "infer":
        return f"{config}: {name} test protocol ({_protocol(name, task)}), eval batch {task.eval_batch_size}"
    if kind == "vae":
        return (f"{config}: the VAE encoder on {task.batch_size} synthetic eval frames, the fp32 reference with "
                f"TF32 {_on(cfg.train.tf32)}")
    t, ds = cfg.train, cfg.deepspeed
    return (f"{config}: {_training_input(name, task, text_dim)}; ZeRO-{ds.zero_stage} {'bf16' if ds.bf16 else 'fp32'}; "
            f"VAE {cfg.model.vae_dtype}, TF32 {_on(t.tf32)}, cuDNN benchmark {_on(t.cudnn_benchmark)}, "
            f"{'NHWC' if t.channels_last else 'NCHW'}, {'compiled' if t.compile else 'eager'}, "
            f"overlap_comm {_on(ds.overlap_comm)}, JPEG decode on the {cfg.data.jpeg_decode}")


def _training_input(name: str, task: Any, text_dim: int) -> str:
    if name == "depth":
        return f"depth {task.crop_size[0]}x{task.crop_size[1]}, 1 class token"
    if name == "seg":
        return f"seg {task.crop_size[0]}x{task.crop_size[1]}, {task.num_classes} class tokens, attention maps"
    return (f"refer {task.image_size}x{task.image_size}, {task.max_tokens} tokens of the {text_dim}-d tiny CLIP "
            f"text encoder, attention maps")


def _protocol(name: str, task: Any) -> str:
    if name == "depth":
        return f"{task.crop_size[0]}x{task.crop_size[1]} sliding windows{' + flip' if task.test_flip else ''}"
    if name == "seg":
        return (f"{task.test_mode}, scale {list(task.scale)}, ratios {list(task.test_ratios)}"
                f"{' + flip' if task.test_flip else ''}")
    return f"{task.image_size}x{task.image_size}, one forward per sentence"


def _train_cells(row: dict[str, Any], cpu: bool) -> list[str]:
    pieces = row["pieces"]
    memory = "n/a (CPU)" if cpu else None
    return [str(row["micro"]), str(row["steps"]), _num(row["s_per_step"], ".4g"), _num(row["samples_per_s"]),
            "not counted" if row["flops"] is None else _num(row["flops"] / 1e12),
            "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}",
            memory or _num(row["alloc"], ".1f"), memory or _num(row["reserved"], ".1f"),
            "not measured (in-memory batches)", _num(pieces["vae"]), _num(pieces["forward"] + pieces["backward"]),
            _num(pieces["optimizer"]), _num(pieces["augment"]), row["notes"]]


def _infer_cells(row: dict[str, Any], cpu: bool) -> list[str]:
    memory = "n/a (CPU)" if cpu else None
    return [row["input"], row["dtype"], str(row["frames"]), _num(row["fps"]), memory or _num(row["alloc"], ".2f"),
            memory or _num(row["reserved"], ".2f")]


def _vae_cells(row: dict[str, Any], cpu: bool) -> list[str]:
    return [f"{row['rel_l2']:.2e} ({row['images']})"]


CELLS = {"train": (TRAIN_COLUMNS, _train_cells), "infer": (INFER_COLUMNS, _infer_cells),
         "vae": (VAE_COLUMNS, _vae_cells)}


def table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns), *(f"| {' | '.join(r)} |" for r in rows)]


def _header(meta: dict[str, Any], device: str, counts: dict[str, int], scale: Scale, smoke: bool,
            seconds: float) -> list[str]:
    """The lines naming the run: command, date, device and peak, versions, weights, step counts."""
    from importlib.metadata import version

    command = f"python -m vpd_ray.bench gpu{' --cpu-smoke' if smoke else ''}"
    kind = "CPU smoke run (tiny model; says nothing about GPU speed)" if smoke else "GPU run"
    peak = f"{meta['peak']:g} TFLOP/s dense bf16" if meta.get("peak") else "n/a (MFU not printed)"
    weights = "tiny backbone shapes" if smoke else "SD v1-5 shapes (vpd_ray/model/sd15)"
    return [f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s: {kind}", "",
            f"- device: {device}; peak: {peak}; torch {meta.get('torch', '?')}, DeepSpeed {version('deepspeed')}, "
            f"one Ray Train worker ({meta.get('backend', '?')})",
            f"- weights: random, {weights}: UNet {_count(counts['unet'])} parameters, VAE encoder "
            f"{_count(counts['vae_encoder'])}",
            f"- training rows: {scale.warmup} warm-up step(s) (the first FLOP-counted) not timed, {scale.steps} "
            f"timed steps, then {scale.instrumented} instrumented step(s) for the ms columns; inference: "
            f"{scale.warmup} warm-up and {scale.steps} timed predictions"]


def render(phases: list[Phase], configs: dict[str, Any], rows: dict[str, Any], counts: dict[str, int],
           arch: dict[str, Any], scale: Scale, smoke: bool, seconds: float, failure: str) -> str:
    """The markdown: a header naming the run, then the training, inference and VAE tables."""
    meta = rows["meta"]
    device = meta.get("device", "unknown (the worker reported nothing)")
    lines = _header(meta, device, counts, scale, smoke, seconds)
    if failure:
        lines.append(f"- {failure}")
    for kind, (columns, cells) in CELLS.items():
        body = []
        for phase in (p for p in phases if TABLES[p.kind] == kind):
            what = (describe(configs[phase.name], phase.kind, arch["unet"]["cross_attention_dim"])
                    if phase.name in configs else f"configs/{CONFIGS[phase.task]} with {', '.join(phase.overrides)}")
            for row in rows.get(phase.name, [{"status": "not run (the worker stopped before it)"}]):
                got = [row["status"]] + ["-"] * (len(columns) - 3) if "status" in row else cells(row, device == "CPU")
                body.append([phase.name, what, *got])
        lines += ["", *table(columns, body)]
    return "\n".join(lines) + "\n"


def _has_cuda() -> bool:
    """Checked on the driver, the worker's machine: else Ray would wait for a GPU that never comes."""
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from vpd_ray.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same phases at tiny size on the CPU")
    parser.add_argument("--out", help="also write the markdown to this file")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the phases that would end later")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: by name)")
    parser.add_argument("--phases", nargs="+", choices=[p.name for p in PHASES], help="run only these")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not _has_cuda():
        print("bench gpu: no CUDA device on this machine (the tiny run on the CPU: --cpu-smoke)", file=sys.stderr)
        return 2
    phases = [p for p in PHASES if not args.phases or p.name in args.phases]
    try:
        text, tracebacks = run(args.cpu_smoke, phases, args.budget_s, args.peak_tflops, num_cpus=args.num_cpus)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(text, flush=True)
    for trace in tracebacks:
        print(trace, file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
