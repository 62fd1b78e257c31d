"""What ``python -m vpd_ray.bench gpu`` runs inside its one Ray Train worker (the driver side, phases
and tables: :mod:`vpd_ray.benchmarks.gpu`).

A training phase builds the product's :class:`~vpd_ray.engine.loop.Trainer` from the phase's config,
so the DeepSpeed config (:func:`~vpd_ray.engine.optim.deepspeed_config`), the speed options
(:mod:`vpd_ray.engine.speed`), the VAE outside the engine and the ZeRO-2 bf16 engine are the shipped
ones, and drives the trainer's own ``Stepper`` over one in-memory batch: samples of the task's
synthetic renderer (:mod:`vpd_ray.data.synth`) decoded and transformed by the task's train
transform, i.e. the product's batch layout at the config's sizes, with no loader to wait for.

Each training phase runs, in this order: one step under ``FlopCounterMode`` (the first warm-up step),
the other warm-up steps, the timed steps (:func:`~vpd_ray.benchmarks.train.seconds_per_step`: no
device sync inside, as the trainer runs), then an instrumented pass that times the step's pieces
between device syncs, which stall the queue the timed pass keeps full. Inference phases time the
task's test protocol (``VPDModel.predict``) in fp32 and under bf16 autocast, as ``infer --dtype`` does.

Rows go to a JSON-lines file of the driver's as each phase ends (the benchmark runs on one machine),
so a worker that dies mid-way (a compile that crashes, say) still leaves the rows before it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
import itertools
import json
import time
import traceback
from typing import Any, Callable, Iterator

import torch

# Peak dense bf16 TFLOP/s (NVIDIA datasheets, without sparsity); the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


# --- figures ----------------------------------------------------------------------------------

def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of a CUDA device: ``override`` (``--peak-tflops``), else the table's
    entry for ``device_name``; None where neither knows it (MFU is then not printed)."""
    if override:
        return override
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def mfu(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the step's counted FLOPs per second over the device's peak."""
    if flops is None or peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)


def _cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad, query, key, value)


def flop_counter() -> Any:
    """torch's ``FlopCounterMode`` (matmuls, convolutions, attention kernels at 2 FLOPs per
    multiply-add), taught the CPU's fused attention kernels, which its registry has only for CUDA."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward})


def counted_step(stepper: Any, name: str, batch: dict[str, Any]) -> int:
    """FLOPs of one optimizer step of ``stepper`` on ``batch``: the VAE encode, the forward and the
    backward (the optimizer's elementwise updates count nothing)."""
    with flop_counter() as counter:
        float(stepper.step(0, {name: itertools.repeat(batch)}))
    return counter.get_total_flops()


class Pieces:
    """Seconds of named pieces of a step, each between device syncs (the instrumented pass only)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def timed(self, piece: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[piece] += time.perf_counter() - start
            return out

        return run


class TimedEngine:
    """The stepper's engine with its three calls timed: forward (UNet + head), backward (with ZeRO's
    gradient bucketing), step (the optimizer)."""

    def __init__(self, engine: Any, pieces: Pieces):
        self._forward = pieces.timed("forward", engine)
        self.backward = pieces.timed("backward", engine.backward)
        self.step = pieces.timed("optimizer", engine.step)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


def piece_ms(stepper: Any, name: str, batch: dict[str, Any], steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step of the on-device augmentation (with the JPEG decode under
    ``data.jpeg_decode: device``), VAE encode, forward, backward and optimizer step: a shallow copy of
    ``stepper`` whose task, engine and encoder are the same objects, timed."""
    pieces = Pieces(device)
    probe, task = copy.copy(stepper), copy.copy(stepper.tasks[name])
    task.augment_on_device = pieces.timed("augment", stepper.tasks[name].augment_on_device)
    probe.tasks = {**stepper.tasks, name: task}
    probe.engine, probe.encode = TimedEngine(stepper.engine, pieces), pieces.timed("vae", stepper.encode)
    for _ in range(steps):
        float(probe.step(0, {name: itertools.repeat(batch)}))
    return {piece: seconds / steps * 1000 for piece, seconds in pieces.seconds.items()}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> tuple[float | None, float | None]:
    """Peak allocated and reserved device memory since :func:`reset_peak`; None on a CPU."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def held_gib(device: torch.device) -> float | None:
    """Device memory still allocated: before a phase builds anything it should be ~0 (else a leak)."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the last phase left (its model and engine hold reference cycles: collect them)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- batches ----------------------------------------------------------------------------------

def render_hw(task: Any) -> tuple[int, int]:
    """The synthetic frame for ``task``: its crop (depth, seg) or square (refer) tall and 4/3 as wide,
    NYU's 480x640 at the depth crop, wider than the crop so the train crop and test windows have room."""
    h, w = (task.cfg.image_size,) * 2 if task.name == "refer" else tuple(task.cfg.crop_size)
    return h, w * 4 // 3


def synthetic_samples(task: Any, count: int, train: bool = True, seed: int = 0,
                      defer_jpeg: bool = False) -> list[dict[str, Any]]:
    """``count`` samples of the task's synthetic renderer, decoded and put through the task's train
    (or eval) transform as the stream does; ``defer_jpeg``: their JPEGs left for the step to decode
    (``data.jpeg_decode: device``)."""
    import numpy as np

    from vpd_ray.data.decode import decode_sample, wanted_extensions
    from vpd_ray.data.synth import RENDERERS

    wanted, rng = wanted_extensions(task.fields), np.random.default_rng(seed)
    samples = []
    for i in range(count):
        raw = RENDERERS[task.name](seed, i, render_hw(task))
        sample = decode_sample(raw, f"synth_{i}", "synthetic", wanted, defer_jpeg=defer_jpeg)
        samples.append(task.train_transform(sample, rng) if train else task.eval_transform(sample))
    return samples


def batch_of(samples: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """A collated batch of ``size``, the samples repeated as needed (the stream's collate)."""
    from vpd_ray.data.pipeline import collate

    return collate([samples[i % len(samples)] for i in range(size)])


# --- phases -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What every phase of the worker shares."""

    device: torch.device
    steps: int  # timed steps (training) or timed predictions (inference)
    warmup: int  # warm-up steps, the FLOP-counted one included
    instrumented: int  # steps of the instrumented pass
    max_batch: int  # the micro-batch search's cap
    peak: float | None  # TFLOP/s, None: MFU not printed
    loop_config: dict[str, Any]  # the worker's (its console handle reaches the driver)
    deadline: float  # time.time() by which the last phase must end
    longest: float = 0.0  # seconds of the longest phase so far: the next one is expected to take as long
    flops: dict[tuple, int] = dataclasses.field(default_factory=dict)  # eager counts, for compiled rows

    def fits(self, seconds: float) -> bool:
        return time.time() + seconds <= self.deadline


def measure_training(trainer: Any, batch: dict[str, Any], micro: int, run: Run) -> dict[str, Any]:
    """One training row: FLOP-counted step, warm-up, timed steps, instrumented pass."""
    from vpd_ray.benchmarks.train import seconds_per_step

    name, stepper = next(iter(trainer.tasks)), trainer.stepper
    image = batch["image"]  # a tensor, or the JPEGs the step decodes (data.jpeg_decode: device)
    key = (name, micro, tuple(image.shape[-2:]) if torch.is_tensor(image) else "jpeg")
    warmup = run.warmup
    if not trainer.cfg.train.compile:  # counted on the eager step; a compiled one does the same arithmetic
        run.flops[key] = counted_step(stepper, name, batch)
        warmup -= 1
    reset_peak(run.device)
    seconds = seconds_per_step(stepper, name, [batch] * (warmup + run.steps), warmup)
    alloc, reserved = peak_gib(run.device)
    flops = run.flops.get(key)
    return {"micro": micro, "steps": run.steps, "s_per_step": seconds, "samples_per_s": micro / seconds,
            "flops": flops, "mfu": mfu(flops, seconds, run.peak), "alloc": alloc, "reserved": reserved,
            "pieces": piece_ms(stepper, name, batch, run.instrumented, run.device),
            "notes": "" if flops else "FLOPs not counted (compiled: run the eager phase of this size first)"}


@contextlib.contextmanager
def product_trainer(cfg: Any, run: Run) -> Iterator[Any]:
    """The product's trainer for one phase, its DeepSpeed engine destroyed on the way out: the ZeRO
    optimizer's gradient-accumulation hooks sit on autograd's C++ nodes, a cycle Python's collector
    cannot see, so without ``destroy`` every phase's model states would stay on the device."""
    from vpd_ray.engine.loop import Trainer

    trainer = Trainer(cfg, run.loop_config)
    try:
        yield trainer
    finally:
        trainer.engine.destroy()


def train_phase(cfg: Any, run: Run) -> list[dict[str, Any]]:
    """The config's task at its micro-batch."""
    held = held_gib(run.device)
    with product_trainer(cfg, run) as trainer:
        task = next(iter(trainer.tasks.values()))
        micro = trainer.plan.micro[task.name]
        deferred = cfg.data.jpeg_decode == "device"
        batch = batch_of(synthetic_samples(task, micro, defer_jpeg=deferred), micro)
        row = measure_training(trainer, batch, micro, run)
    notes = decode_gap(batch["image"], run.device) if deferred else row["notes"]
    return [{**row, "notes": _notes(notes, held)}]


def decode_gap(images: list[Any], device: torch.device) -> str:
    """How far the device's decode of a batch's JPEGs is from the loader's (simplejpeg: libjpeg-turbo),
    in 8-bit levels: nvJPEG's IDCT and chroma upsampling are its own."""
    from vpd_ray.data.device_decode import decode_jpegs

    jpegs = [item.image for item in images if item.image is not None]
    pairs = zip(decode_jpegs(jpegs, device), decode_jpegs(jpegs, torch.device("cpu")))
    gaps = torch.cat([(a.cpu().int() - b.int()).abs().flatten() for a, b in pairs])
    same = " (the same decoder on a CPU)" if device.type == "cpu" else ""
    return (f"decode vs the loader's over {len(jpegs)} JPEGs: max {int(gaps.max())} levels, "
            f"mean {gaps.float().mean().item():.3f}{same}")


def batch_ladder(start: int, cap: int) -> list[int]:
    """The search's micro-batches: 4, 6, 8, 12, 16, 24, ... (each 1.33x or 1.5x the last) above
    ``start`` up to ``cap``."""
    return sorted(b for b in {m * 2**k for m in (2, 3) for k in range(16)} if start < b <= cap)


def largest_fitting(measure: Callable[[int], dict[str, Any]], sizes: list[int],
                    fits: Callable[[float], bool]) -> tuple[dict[str, Any] | None, str]:
    """Measure each size in turn until one runs out of device memory, the budget cannot take the next
    (expected to take twice the last), or the sizes end: the last row that fit, and why it stopped.
    Nothing is measured after an out-of-memory error: the caller drops the engine it broke."""
    best, last, size = None, 0.0, None
    for size in sizes:
        if not fits(2 * last):
            return best, f"stopped before {size} (budget)"
        start = time.time()
        try:
            best = measure(size)
        except torch.OutOfMemoryError:
            return best, f"{size}: out of memory"
        last = time.time() - start
    return best, f"the cap ({size})"


def search_phase(cfg: Any, run: Run) -> list[dict[str, Any]]:
    """The largest micro-batch that fits, searched upward from the config's in one trainer (the
    engine does not fix its batch size), each rung measured as a training row."""
    held = held_gib(run.device)
    with product_trainer(cfg, run) as trainer:
        task = next(iter(trainer.tasks.values()))
        start = trainer.plan.micro[task.name]
        samples = synthetic_samples(task, min(run.max_batch, 4))
        row, why = largest_fitting(lambda b: measure_training(trainer, batch_of(samples, b), b, run),
                                   batch_ladder(start, run.max_batch), run.fits)
    if row is None:
        return [{"status": f"no micro-batch above {start} measured ({why})"}]
    return [{**row, "notes": _notes(f"largest that fit; stopped at {why}", held)}]


def _notes(text: str, held: float | None) -> str:
    parts = [text] if text else []
    if held is not None:
        parts.append(f"{held:.2f} GiB held before the build")
    return "; ".join(parts)


def time_predict(model: Any, name: str, batch: dict[str, Any], dtype: str, run: Run) -> dict[str, Any]:
    """Frames/s of ``VPDModel.predict`` (the task's test protocol) on ``batch`` as the inference
    predictor runs it (inference mode, ``speed.autocast`` of ``--dtype``), and the peak memory of the
    timed predictions."""
    from vpd_ray.engine import speed

    sync = Pieces(run.device).sync
    with torch.inference_mode(), speed.autocast(run.device, dtype):
        for _ in range(run.warmup):
            model.predict(name, batch)
        release(run.device)  # blocks cached before are not this run's
        reset_peak(run.device)
        sync()
        start = time.perf_counter()
        for _ in range(run.steps):
            model.predict(name, batch)
        sync()
    seconds = time.perf_counter() - start
    alloc, reserved = peak_gib(run.device)
    frames = run.steps * batch["image"].shape[0]
    return {"input": _input(batch), "frames": frames, "fps": frames / seconds, "alloc": alloc, "reserved": reserved}


def _input(batch: dict[str, Any]) -> str:
    """``"1 x 480x640"``, and the sentences of a refer batch (one forward each)."""
    b, _, h, w = batch["image"].shape
    sentences = f", {int(batch['sentence_valid'].sum())} sentences" if "sentence_valid" in batch else ""
    return f"{b} x {h}x{w}{sentences}"


def infer_phase(cfg: Any, run: Run) -> list[dict[str, Any]]:
    """The test protocol on one eval batch (``eval_batch_size`` frames) as ``infer --dtype fp32`` and
    ``--dtype bf16`` run it, on the backend flags ``infer`` leaves alone (PyTorch's defaults: the
    inference phases run before any trainer sets ``train.tf32`` / ``train.cudnn_benchmark``)."""
    from vpd_ray.engine.evaluation import to_device
    from vpd_ray.modeling import build_model

    model = build_model(cfg).eval().to(run.device)
    name, task = next(iter(model.tasks.items()))
    batch = batch_of(synthetic_samples(task, task.cfg.eval_batch_size, train=False), task.cfg.eval_batch_size)
    batch = to_device(batch, run.device)
    labels = {"fp32": "fp32", "bf16": "bf16 autocast (fp32 weights)"}
    return [{"dtype": label, **time_predict(model, name, batch, dtype, run)} for dtype, label in labels.items()]


def vae_phase(cfg: Any, run: Run) -> list[dict[str, Any]]:
    """Relative L2 error of the VAE's latents in bf16 against fp32 (TF32 as ``train.tf32``) on a
    micro-batch of eval frames (eval transforms give [0,1] images on every task; the trainer's VAE
    path is the same ``encode``)."""
    from vpd_ray.engine import speed
    from vpd_ray.modeling import build_model

    speed.configure_backends(cfg.train, run.device)
    model = build_model(cfg)
    task, backbone = next(iter(model.tasks.values())), model.backbone
    backbone.vae.to(run.device)  # encode needs nothing else
    samples = synthetic_samples(task, task.cfg.batch_size, train=False)
    images = batch_of(samples, len(samples))["image"].to(run.device)
    reference = backbone.encode(images)
    backbone.vae.to(torch.bfloat16)
    error = ((backbone.encode(images).float() - reference).norm() / reference.norm()).item()
    return [{"rel_l2": error, "images": _input({"image": images})}]


PHASES = {"train": train_phase, "search": search_phase, "infer": infer_phase, "vae": vae_phase}


def _device(use_gpu: bool) -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device() if use_gpu else torch.device("cpu")


def _first_line(err: BaseException) -> str:
    from vpd_ray.errors import first_line

    return f"{type(err).__name__}: {first_line(err)}"


def worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: every phase in order, each row appended to the rows file
    as it is measured; a phase that fails is a row naming its error, and the next one runs."""
    import torch.distributed as dist

    from vpd_ray.config import from_container
    from vpd_ray.engine.console import say

    opts = loop_config["options"]
    device = _device(loop_config["config"]["scaling"]["use_gpu"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(name, opts["peak_tflops"]) if device.type == "cuda" else None
    run = Run(device, opts["steps"], opts["warmup"], opts["instrumented"], opts["max_batch"], peak, loop_config,
              loop_config["deadline"])
    _append(loop_config["rows"], {"table": "meta", "device": name, "peak": peak, "backend": dist.get_backend(),
                                  "torch": torch.__version__})
    for phase in loop_config["phases"]:
        if not run.fits(max(run.longest, phase["expected_s"])):
            rows = [{"status": "skipped (budget)"}]
        else:
            start = time.time()
            try:
                rows = PHASES[phase["kind"]](from_container(phase["config"]), run)
            except Exception as err:  # noqa: BLE001 - one phase's failure is its row; the others still run
                rows = [{"status": f"failed: {_first_line(err)}", "traceback": traceback.format_exc()}]
            release(device)
            run.longest = max(run.longest, time.time() - start)
            say(loop_config, f"bench gpu: {phase['name']} in {time.time() - start:.0f} s")
        for row in rows:
            _append(loop_config["rows"], {"phase": phase["name"], **row})


def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
