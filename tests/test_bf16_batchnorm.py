"""BatchNorm running statistics stay fp32 under the product's bf16 DeepSpeed config (issue #11, item 5).

Engines run in this process, world size 1 over gloo, with ``vpd_ray.engine.optim.deepspeed_config``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpd_ray.config import compose, to_yaml
from vpd_ray.engine import checkpoint as ckpt
from vpd_ray.engine.loop import detach_vae
from vpd_ray.engine.optim import deepspeed_config, param_groups
from vpd_ray.model.heads.norm import FP32BatchNorm2d
from vpd_ray.modeling import architecture, build_model
from vpd_ray.package import export_package, load_package

STEPS, CHANNELS, BATCH = 150, 8, 4


def _engine(model: nn.Module, config: str, bf16: bool):
    """A ZeRO-2 engine on ``model`` with the product's DeepSpeed config of ``configs/{config}.yaml``."""
    import deepspeed

    cfg = compose(f"configs/{config}.yaml", [f"deepspeed.bf16={bf16}", "deepspeed.zero_stage=2"])
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-3, 0.01, 1.0))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, BATCH, 1))
    return engine


def _train_step(engine, *inputs) -> None:
    engine.backward(engine(*inputs).float().square().mean())
    engine.step()


def _float_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in module.named_buffers() if b.is_floating_point()}


def _stats_batches():
    """bf16-representable activations, channel means 50..100 drifting by < 0.1 per batch: the running
    mean's 0.1-momentum updates are then mostly below half a bf16 step (0.125-0.25 there), which bf16 drops."""
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(50, 100, CHANNELS)[None, :, None, None]
    for t in range(STEPS):
        yield (base + 2 * math.sin(t / 20) + torch.randn(BATCH, CHANNELS, 8, 8, generator=g)).bfloat16()


class _NormProbe(nn.Module):
    """The heads' BatchNorm first, so the fp32 and the bf16 run normalise exactly the same values."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.bn = norm
        self.proj = nn.Conv2d(CHANNELS, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bn(x))


def _forward_backward(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of ``norm`` on ``x`` (loss weighted by ``x`` itself)."""
    x_in = x.clone().requires_grad_()
    out = norm(x_in)
    (out * x).sum().backward()
    return out.detach(), x_in.grad


def test_fp32_batchnorm_is_nn_batchnorm_bit_for_bit_in_fp32():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = FP32BatchNorm2d(CHANNELS)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same keys: old packages and checkpoints load
    for train in (True, True, False):
        x = torch.randn(3, CHANNELS, 5, 7) * 10 + 3
        (out, grad), (expected, expected_grad) = (_forward_backward(n.train(train), x) for n in (ours, ref))
        assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    for name, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_bf16_engine_tracks_running_statistics_as_an_fp32_run(process_group, tmp_path):
    torch.manual_seed(0)
    fp32 = _engine(_NormProbe(FP32BatchNorm2d(CHANNELS)), "sample", bf16=False)
    bf16 = _engine(_NormProbe(FP32BatchNorm2d(CHANNELS)), "sample", bf16=True)
    old = nn.BatchNorm2d(CHANNELS).bfloat16()  # the former engine: stats as bf16 buffers
    assert bf16.module.bn.weight.dtype == torch.bfloat16  # the engine casts the affine parameters
    for x in _stats_batches():
        _train_step(fp32, x.float())
        _train_step(bf16, x)
        old(x)
    want, got = _float_buffers(fp32.module.bn), _float_buffers(bf16.module.bn)
    assert all(b.dtype == torch.float32 for b in got.values())
    drift = {name: (got[name] - want[name]).abs().max().item() for name in want}
    old_drift = {name: (getattr(old, name).float() - want[name]).abs().max().item() for name in want}
    print(f"\nmax |bf16 - fp32| running stats after {STEPS} steps: new {drift}, old bf16 buffers {old_drift}")
    assert max(drift.values()) <= 1e-4
    assert old_drift["running_mean"] > 100 * 1e-4  # the bug this guards against, measured the same way
    # The checkpoint's module state and its consolidation keep the exact fp32 values.
    bf16.save_checkpoint(str(tmp_path), tag=ckpt.TAG)
    ckpt.write_rank0_files(str(tmp_path), {"zero_stage": 2}, "", ckpt.frozen_state(bf16.module), {})
    saved = torch.load(tmp_path / ckpt.TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    consolidated = ckpt.consolidated_state_dict(str(tmp_path))
    for name, value in got.items():
        assert saved[f"bn.{name}"].dtype == torch.float32 and torch.equal(saved[f"bn.{name}"], value)
        assert torch.equal(consolidated[f"bn.{name}"], value)


@pytest.mark.parametrize("config", ["sample", "sample_seg"])
def test_tiny_vpd_model_trains_under_bf16_with_fp32_buffers(process_group, tmp_path, config):
    """Forward + backward + step of a bf16 ZeRO-2 engine (VAE outside it, as the train loop), then
    checkpoint -> consolidated state -> package: every floating buffer is fp32 and exact throughout."""
    cfg = compose(f"configs/{config}.yaml")
    model = build_model(cfg)
    frozen, arch = ckpt.frozen_state(model), architecture(model)
    detach_vae(model)  # stays fp32, outside the engine
    engine = _engine(model, config, bf16=True)
    task = next(iter(cfg.tasks))
    batch = {"image": torch.rand(BATCH, 3, 64, 64), "class_id": torch.tensor([0, 1, -1, 2])}
    latents = engine.module.backbone.encode(batch["image"]).to(torch.bfloat16)
    _train_step(engine, task, batch, latents)
    buffers = _float_buffers(engine.module)
    assert all(b.dtype == torch.float32 for b in buffers.values()), {n: b.dtype for n, b in buffers.items()}
    assert all(n.num_batches_tracked == 1 for n in engine.module.modules() if isinstance(n, FP32BatchNorm2d))
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag=ckpt.TAG)
    ckpt.write_rank0_files(str(tmp_path / "ckpt"), {"zero_stage": 2}, "", frozen, arch)
    export_package(ckpt.consolidated_state_dict(str(tmp_path / "ckpt")), to_yaml(cfg), arch, str(tmp_path / "pkg"))
    packaged = dict(load_package(str(tmp_path / "pkg"))[0].named_buffers())
    for name, value in buffers.items():
        assert packaged[name].dtype == torch.float32 and torch.equal(packaged[name], value), name
