"""Speed options compute what the plain path computes, within stated tolerances, and every one can be
turned off (their defaults keep the reference's numerics on CPU): channels_last, torch.compile of the
UNet, the VAE in bf16, ZeRO's communication options."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vpd_ray.config import ConfigError, load
from vpd_ray.engine import speed
from vpd_ray.engine.optim import deepspeed_config
from vpd_ray.model.backbone import VPDBackbone
from vpd_ray.modeling import VPDModel
from vpd_ray.tasks.depth import DepthConfig, DepthTask
from vpd_ray.tasks.seg import SegConfig, SegTask


def _model(tiny_backbone_config) -> VPDModel:
    torch.manual_seed(0)
    tasks = {"depth": DepthTask(DepthConfig(head_dim=16)),
             "seg": SegTask(SegConfig(num_classes=6, class_set="synth_seg", crop_size=[64, 64], scale=[128, 64],
                                      neck_channels=16, head_channels=8))}
    return VPDModel(VPDBackbone.from_config(tiny_backbone_config), tasks)


def _outputs_and_grads(model: VPDModel, images: torch.Tensor, train, tasks=("depth", "seg")
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tasks' outputs of one batch (depth: a scene token; seg: class tokens with attention maps), and
    the gradients of their summed losses."""
    images = speed.to_memory_format(images, train)
    batches = {"depth": {"image": images, "class_id": torch.tensor([1, -1])}, "seg": {"image": images}}
    outputs = [model(task, batches[task]) for task in tasks]
    model.zero_grad()
    sum(out.logsumexp(1).mean() if out.shape[1] > 1 else out.mean() for out in outputs).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return [out.detach() for out in outputs], grads


def _train(**options):
    return OmegaConf.create({"tf32": True, "cudnn_benchmark": True, "channels_last": False, "compile": False,
                             **options})


def _assert_same(plain, fast, rtol, atol):
    assert len(plain[1]) == len(fast[1])
    for a, b in zip(plain[0] + plain[1], fast[0] + fast[1]):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def test_channels_last_matches_the_plain_path(tiny_backbone_config):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = _outputs_and_grads(_model(tiny_backbone_config), images, _train())
    nhwc = _train(channels_last=True)
    fast = _outputs_and_grads(speed.prepare_model(_model(tiny_backbone_config), nhwc), images, nhwc)
    _assert_same(plain, fast, rtol=1e-4, atol=1e-5)  # the same sums in another order


@pytest.mark.slow  # compiling the tiny UNet's forward and backward takes about half a minute on 2 cores
def test_compiled_unet_matches_eager_with_taps_and_attention_maps(tiny_backbone_config):
    """``aot_eager``: torch.compile's graph capture (dynamo + AOT autograd) without inductor's codegen,
    the part that must cope with the taps and the cross-attention map processor (the seg forward has
    both; one graph keeps the test short)."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = _outputs_and_grads(_model(tiny_backbone_config), images, _train(), tasks=("seg",))
    compiled = speed.prepare_model(_model(tiny_backbone_config), _train(compile=True), compile_backend="aot_eager")
    keys = set(compiled.state_dict())
    fast = _outputs_and_grads(compiled, images, _train(compile=True), tasks=("seg",))
    _assert_same(plain, fast, rtol=1e-5, atol=1e-6)
    assert set(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)  # checkpoints unchanged


def test_vae_in_bf16_stays_close_to_fp32(tiny_backbone_config):
    """Latents of the VAE encoder in bf16 against fp32: within bf16's ~3 significant digits per layer."""
    backbone = VPDBackbone.from_config(tiny_backbone_config)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = backbone.encode(images)
        backbone.vae.to(speed.DTYPES["bf16"])
        fast = backbone.encode(images).float()
    error = ((fast - reference).norm() / reference.norm()).item()
    assert fast.dtype == torch.float32 and error < 2e-2, error


def test_speed_keys_are_validated_and_reach_deepspeed():
    cfg = load("configs/sample.yaml", ["deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=20000000"])
    zero = deepspeed_config(cfg, micro_batch=4, grad_accum=1)["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 20_000_000,
                    "allgather_bucket_size": 500_000_000}
    three = load("configs/sample.yaml", ["deepspeed.zero_stage=3", "deepspeed.grad_accum_dtype=fp32"])
    ds = deepspeed_config(three, micro_batch=4, grad_accum=1)
    assert ds["data_types"] == {"buffer_dtype": "fp32", "grad_accum_dtype": "fp32"}
    assert "allgather_bucket_size" not in ds["zero_optimization"]
    for override, words in [("model.vae_dtype=fp16", "model.vae_dtype"),
                            ("deepspeed.grad_accum_dtype=fp32", "zero_stage 1 or 3 only"),
                            ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size"),
                            ("train.compile=true deepspeed.zero_stage=3", "train.compile")]:
        with pytest.raises(ConfigError, match=words):
            load("configs/sample.yaml", override.split())


def test_cuda_flags_are_left_alone_on_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    speed.configure_backends(_train(tf32=True, cudnn_benchmark=True), torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before
