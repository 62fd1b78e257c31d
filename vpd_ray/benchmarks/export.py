"""``python -m vpd_ray.bench export``: peak memory of ``vpd_ray.export``, streaming vs the old in-memory path.

Both sides export the same ZeRO checkpoint, each in a fresh process: the in-memory path is what
``vpd_ray.export`` did before streaming (DeepSpeed's eager zero_to_fp32 to the full fp32 state
dict, a full model loaded from it, ``save_file`` of its state dict); the streaming path is
:func:`vpd_ray.export.export_checkpoint`.
Peak RSS is the kernel's high-water mark (``VmHWM``, which counts the pages of the mmapped shards
that were read: the kernel can drop those under pressure); peak anonymous RSS is sampled every 5 ms.

The checkpoint is written by DeepSpeed itself (``--ranks`` gloo processes, one AdamW step, ZeRO
bf16, so the masters differ from the bf16 module) from a random model: the sample config's backbone
widened by ``--channels`` (the default, [160, 320, 640, 640], makes a 223M-parameter model).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sample.yaml")


def _save_rank(rank: int, config: dict[str, Any], directory: str, world: int, port: int) -> None:
    """One DeepSpeed rank: build the model, one AdamW step, then the files the trainer's checkpoint has."""
    import deepspeed
    import torch

    from vpd_ray.config import from_container, to_yaml
    from vpd_ray.engine import checkpoint as ckpt
    from vpd_ray.engine.loop import RunState, detach_vae
    from vpd_ray.engine.optim import deepspeed_config, param_groups
    from vpd_ray.modeling import architecture, build_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = from_container(config)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    frozen, arch = ckpt.frozen_state(model), architecture(model)
    detach_vae(model)
    groups = param_groups(model.named_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.unet_lr_mult)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]  # before DeepSpeed takes the groups
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups),
                                      config=deepspeed_config(cfg, micro_batch=1, grad_accum=1))
    images = torch.rand(1, 3, 128, 128)
    latents = engine.module.backbone.encode(images).to(torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32)
    task = next(iter(cfg.tasks))  # the step only has to move the masters off the initial weights
    engine.backward(engine(task, {"image": images, "class_id": torch.tensor([-1])}, latents=latents).float().mean())
    engine.step()
    engine.save_checkpoint(directory, tag=ckpt.TAG)
    if rank == 0:
        meta = {**dataclasses.asdict(RunState(step=1)), "zero_stage": int(cfg.deepspeed.zero_stage),
                "world_size": world, "param_group_names": group_names, "metrics": {}}
        ckpt.write_rank0_files(directory, meta, to_yaml(cfg), frozen, arch)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def write_checkpoint(cfg: Any, directory: str, ranks: int = 2) -> str:
    """A vpd_ray checkpoint of ``cfg``'s random model after one step, saved by ``ranks`` DeepSpeed processes."""
    import torch.multiprocessing
    from omegaconf import OmegaConf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_save_rank, args=(OmegaConf.to_container(cfg, resolve=True), directory, ranks, port),
                                nprocs=ranks, join=True)
    return directory


def in_memory_state_dict(checkpoint: str) -> dict[str, Any]:
    """``consolidated_state_dict`` as it was before streaming: DeepSpeed's eager zero_to_fp32 for ZeRO 1-3
    (ZeRO-0: today's reader, which differs only in mmapping the file)."""
    from safetensors.torch import load_file

    from vpd_ray.engine import checkpoint as ckpt

    if ckpt.read_meta(checkpoint)["zero_stage"] == 0:
        return ckpt.consolidated_state_dict(checkpoint)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt.assert_safe(checkpoint)
    state = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=ckpt.TAG).items()}
    state.update(load_file(os.path.join(checkpoint, ckpt.FROZEN)))
    return state


def in_memory_export(checkpoint: str, out_dir: str) -> str:
    """The export before streaming: the whole fp32 state dict, a full model loaded from it, then save_file."""
    from safetensors.torch import save_file

    from vpd_ray.engine import checkpoint as ckpt
    from vpd_ray.modeling import build_model
    from vpd_ray.package import CONFIG, WEIGHTS, load_config, load_strict, read_architecture, write_architecture

    state = in_memory_state_dict(checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(checkpoint, ckpt.CONFIG)) as src, open(os.path.join(out_dir, CONFIG), "w") as dst:
        dst.write(src.read())
    arch = read_architecture(checkpoint)
    write_architecture(out_dir, arch)
    model = build_model(load_config(os.path.join(out_dir, CONFIG)), arch)
    load_strict(model, state, source="the consolidated checkpoint")
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "vpd_ray"})
    return out_dir


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measured(export: Callable[[str, str], str], checkpoint: str, out_dir: str) -> dict[str, float]:
    """Run ``export`` here (a fresh process): RSS after the imports both paths need, peak RSS, sampled
    peak anonymous RSS (bytes), seconds."""
    import deepspeed.utils.zero_to_fp32  # noqa: F401  (imports are paid before the baseline)
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    import vpd_ray.modeling  # noqa: F401
    import vpd_ray.package  # noqa: F401

    baseline = _status_kib("VmRSS")
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    export(checkpoint, out_dir)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"baseline": baseline * 1024, "peak": _status_kib("VmHWM") * 1024, "anon": peak_anon[0] * 1024,
            "seconds": seconds}


def measure(export: Callable[[str, str], str], checkpoint: str, out_dir: str) -> dict[str, float]:
    """:func:`_measured` in a fresh spawned process, so one export's peak never hides another's."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measured, export, checkpoint, out_dir).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpd_ray.bench export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an existing vpd_ray checkpoint (default: write one)")
    parser.add_argument("--channels", type=int, nargs=4, default=[160, 320, 640, 640], help="UNet block widths")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed processes writing the checkpoint")
    parser.add_argument("--workdir", help="where the checkpoint and packages go (default: a temp dir)")
    args = parser.parse_args(argv)

    from safetensors import safe_open

    from vpd_ray.config import load
    from vpd_ray.engine.checkpoint import read_meta

    with tempfile.TemporaryDirectory(prefix="vpd_bench_export_", dir=args.workdir) as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            cfg = load(CONFIG, [f"model.backbone.tiny_channels=[{','.join(map(str, args.channels))}]",
                                "model.backbone.tiny_text_dim=768", "model.backbone.tiny_heads=8",
                                f"deepspeed.zero_stage={args.zero_stage}"])
            start = time.perf_counter()
            checkpoint = write_checkpoint(cfg, os.path.join(tmp, "checkpoint"), args.ranks)
            print(f"checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        from vpd_ray.engine.checkpoint import export_checkpoint

        rows = []
        for name, export in (("in-memory (before)", in_memory_export), ("streaming", export_checkpoint)):
            rows.append((name, measure(export, checkpoint, os.path.join(tmp, name.split()[0]))))
            print(f"{name}: peak RSS {rows[-1][1]['peak'] / 2**30:.2f} GiB", flush=True)
        weights = os.path.join(tmp, "streaming", "model.safetensors")
        with safe_open(weights, framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        files = [os.path.join(root, n) for root, _, names in os.walk(checkpoint) for n in names]
        size, ranks = sum(map(os.path.getsize, files)), sum(f.endswith("_optim_states.pt") for f in files)
        stage = read_meta(checkpoint)["zero_stage"]

    gib, model_bytes = 2**30, 4 * params
    print(f"\ncheckpoint: ZeRO-{stage}, {ranks} optimizer shard(s), {size / gib:.2f} GiB on disk; "
          f"consolidated model: {params / 1e6:.1f}M values, fp32 {model_bytes / gib:.2f} GiB; "
          f"CPU ({os.cpu_count()} cores)")
    print("| export | peak RSS (GiB) | peak RSS above imports (GiB) | above imports / fp32 model "
          "| peak anonymous RSS (GiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        above = m["peak"] - m["baseline"]
        print(f"| {name} | {m['peak'] / gib:.2f} | {above / gib:.2f} | {above / model_bytes:.2f}x "
              f"| {m['anon'] / gib:.2f} | {m['seconds']:.1f} |")
    print(f"peak RSS, in-memory / streaming: {rows[0][1]['peak'] / rows[1][1]['peak']:.2f}x")
    return 0

