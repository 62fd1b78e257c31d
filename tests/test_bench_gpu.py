"""``python -m vpd_ray.bench gpu``: its figures (peak lookup, MFU, the FLOP count of a real step, the
micro-batch search) and ``--cpu-smoke``, the GPU run's phases and code at tiny size in one Ray Train
worker with DeepSpeed ZeRO-2 bf16 on gloo, writing every table."""

from __future__ import annotations

import math

import pytest
import torch

from vpd_ray.benchmarks import gpu
from vpd_ray.benchmarks.gpu_worker import batch_ladder, largest_fitting, mfu, peak_tflops


def test_peak_is_looked_up_by_device_name_or_given():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert peak_tflops("NVIDIA GeForce RTX 4090", override=165.0) == 165.0
    assert mfu(989e12 * 0.4, 1.0, 989.0) == pytest.approx(0.4)
    assert mfu(2e12, 0.5, None) is None and mfu(None, 0.5, 989.0) is None


def test_search_keeps_the_last_batch_that_fit():
    def measure(size: int) -> dict:
        if size >= 12:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"micro": size}

    assert batch_ladder(3, 64) == [4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert largest_fitting(measure, batch_ladder(3, 64), lambda s: True) == ({"micro": 8}, "12: out of memory")
    assert largest_fitting(measure, [4, 6], lambda s: True) == ({"micro": 6}, "the cap (6)")
    assert largest_fitting(measure, [4, 6], lambda s: s == 0)[1] == "stopped before 6 (budget)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_run_refuses_a_machine_without_cuda(capsys):
    assert gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_phase_whose_module_is_missing_is_a_row_saying_so(monkeypatch):
    """On a GPU without torchvision the nvJPEG row says why it did not run (its config would be refused)."""
    import importlib.util

    phase = next(p for p in gpu.PHASES if p.name == "jpeg-on-device")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    why = gpu.not_run(phase, smoke=False)
    assert why == "not run: torchvision is not installed (install the build for this torch)"
    assert gpu.not_run(phase, smoke=True) == ""  # the CPU smoke decodes with simplejpeg: no torchvision
    text = gpu.render([phase], {}, {"meta": {}, phase.name: [{"status": why}]}, {"unet": 1, "vae_encoder": 1},
                      {}, gpu.GPU, smoke=False, seconds=1.0, failure="")
    assert f"| jpeg-on-device | configs/nyu.yaml with data.jpeg_decode=device | {why} |" in text


@pytest.fixture
def one_thread():
    """One torch thread, as in a 1-CPU Ray worker: two threads on two shared cores thrash (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_gpu")
    gpu.write_random_sd(str(root / "sd"), gpu.architecture(smoke=True))
    return root


def test_flop_count_of_a_tiny_step_is_plausible(tiny_sd, one_thread):
    """The counted step of the smoke's depth model: about 3x its forward (backward = 2x forward, less
    the frozen VAE's and the first conv's input gradients), linear in the batch, of a tiny model's order."""
    from vpd_ray.benchmarks.gpu_worker import batch_of, counted_step, flop_counter, synthetic_samples
    from vpd_ray.engine.step import Stepper, TorchEngine
    from vpd_ray.modeling import build_model

    depth = next(p for p in gpu.PHASES if p.name == "depth")
    cfg = gpu.phase_config(depth, str(tiny_sd / "sd"), str(tiny_sd / "runs"), smoke=True)
    model = build_model(cfg).train()
    name, task = next(iter(model.tasks.items()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    stepper = Stepper(TorchEngine(model, optimizer), model.tasks, model.backbone.encode)
    samples = synthetic_samples(task, 2)
    step = counted_step(stepper, name, batch_of(samples, 2))
    with flop_counter() as counter, torch.no_grad():
        stepper.loss(name, batch_of(samples, 2))  # the step's forward: VAE, UNet + head, loss
    assert 2.0 < step / counter.get_total_flops() < 3.2
    assert counted_step(stepper, name, batch_of(samples, 4)) == pytest.approx(2 * step, rel=0.01)
    assert 1e7 < step < 1e10  # 64x64 crops through a 2.2 M-parameter UNet: ~0.4 GFLOP


def test_the_jpeg_on_device_phase_steps_on_encoded_jpegs(tiny_sd, one_thread):
    """Its batch carries the JPEGs as the loader leaves them; the step decodes them and does the
    loader path's arithmetic (the decode and crop count no FLOPs)."""
    from vpd_ray.benchmarks.gpu_worker import batch_of, counted_step, decode_gap, synthetic_samples
    from vpd_ray.data.device_decode import PendingImage
    from vpd_ray.engine.step import Stepper, TorchEngine
    from vpd_ray.modeling import build_model

    phase = next(p for p in gpu.PHASES if p.name == "jpeg-on-device")
    cfg = gpu.phase_config(phase, str(tiny_sd / "sd"), str(tiny_sd / "runs"), smoke=True)
    assert cfg.data.jpeg_decode == "device"
    model = build_model(cfg).train()
    name, task = next(iter(model.tasks.items()))
    stepper = Stepper(TorchEngine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.0)),
                      model.tasks, model.backbone.encode)
    deferred = batch_of(synthetic_samples(task, 2, defer_jpeg=True), 2)
    assert isinstance(deferred["image"], list) and all(isinstance(i, PendingImage) for i in deferred["image"])
    decoded = batch_of(synthetic_samples(task, 2), 2)
    assert counted_step(stepper, name, deferred) == counted_step(stepper, name, decoded) > 0
    assert decode_gap(deferred["image"], torch.device("cpu")) == (
        "decode vs the loader's over 2 JPEGs: max 0 levels, mean 0.000 (the same decoder on a CPU)")


def _rows(markdown: str) -> list[list[str]]:
    """The body rows of every markdown table, as cells."""
    return [line.strip("| ").split(" | ") for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| phase |")]


def _finite(cell: str) -> bool:
    value = float(cell.split()[0].rstrip("%"))
    return math.isfinite(value) and value > 0


@pytest.mark.slow  # about 70 s on 2 cores: Ray Train's worker, 12 trainers and 6 models built in turn
def test_cpu_smoke_runs_every_phase_and_writes_the_tables(ray_cluster, tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu.main(["--cpu-smoke", "--out", str(out), "--budget-s", "1200"]) == 0  # a loaded machine skips nothing
    printed = capsys.readouterr().out
    markdown = out.read_text()
    assert markdown in printed and "CPU smoke run (tiny model; says nothing about GPU speed)" in markdown
    rows = _rows(markdown)
    assert sorted({r[0] for r in rows}) == sorted(p.name for p in gpu.PHASES)
    for row in rows:
        phase = next(p for p in gpu.PHASES if p.name == row[0])
        status = row[2]
        assert not status.startswith("failed"), row
        if phase.on_cpu:
            assert status == phase.on_cpu, row
        elif gpu.TABLES[phase.kind] == "train":
            micro, steps, seconds, rate, tflop = row[2:7]
            assert int(micro) >= 1 and int(steps) == gpu.CPU_SMOKE.steps, row
            assert all(_finite(c) for c in (seconds, rate, tflop, *row[11:15])), row  # ms columns, augment too
            assert row[7] == "n/a" and row[8] == "n/a (CPU)", row  # MFU and memory: no GPU
        elif gpu.TABLES[phase.kind] == "infer":  # one row in fp32, one under bf16 autocast
            assert _finite(row[5]) and row[6] == "n/a (CPU)", row
            assert [r[3].split()[0] for r in rows if r[0] == phase.name] == ["fp32", "bf16"], row
        else:
            assert _finite(row[2]) and float(row[2].split()[0]) < 0.05, row  # bf16 VAE latents: ~1e-2
    assert "depth-max-batch" in {r[0] for r in rows if r[2] == "4"}  # the search reached the smoke's cap
    assert "max 0 levels" in next(r for r in rows if r[0] == "jpeg-on-device")[-1]  # simplejpeg both ways
