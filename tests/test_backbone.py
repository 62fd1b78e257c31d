"""VPDBackbone: taps, padding, cross-attention maps, gradients, the three ways to build it, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vpd_ray.model.backbone import BackboneConfig, ClassEmbeddings, TextAdapter, VPDBackbone


@pytest.fixture(scope="module")
def backbone(tiny_backbone_config):
    return VPDBackbone.from_config(tiny_backbone_config)


def _context(bb, batch=1, tokens=1, seed=0):
    return torch.randn(batch, tokens, bb.text_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side", [480, 512])
def test_taps_shapes_and_strides(backbone, side):
    image = torch.rand(1, 3, side, side)
    with torch.no_grad():
        feats = backbone(image, _context(backbone))
    info = backbone.feature_info()
    assert [f["reduction"] for f in info] == [8, 16, 32, 64]
    for feat, f in zip(feats, info):  # strides are relative to the image padded to 512
        assert tuple(feat.shape) == (1, f["num_chs"], 512 // f["reduction"], 512 // f["reduction"])


def test_encode_pads_in_signed_space_and_uses_posterior_mode(backbone):
    image = torch.rand(1, 3, 480, 480)
    latents = backbone.encode(image)
    padded = torch.zeros(1, 3, 512, 512)
    padded[..., :480, :480] = image * 2 - 1
    expected = backbone.vae.encode(padded).latent_dist.mean  # the mode; unscaled (no 0.18215)
    torch.testing.assert_close(latents, expected)
    assert not latents.requires_grad


def test_latent_scale_scales_what_the_unet_sees(tiny_backbone_config):
    """TADP's corrected scaling multiplies the latents; VPD's default leaves them as the VAE gives them."""
    import dataclasses

    from vpd_ray.model.backbone import VPDBackbone

    plain = VPDBackbone.from_config(tiny_backbone_config)
    scaled = VPDBackbone.from_config(dataclasses.replace(tiny_backbone_config, latent_scale=0.18215))
    image, context = torch.rand(1, 3, 64, 64), torch.randn(1, 1, plain.text_dim)
    latents = plain.encode(image)
    assert torch.equal(latents, plain.vae.encode(image * 2 - 1).latent_dist.mode())  # 1.0: bit for bit
    assert torch.equal(scaled.encode(image), latents * 0.18215)
    assert not torch.allclose(scaled(image, context)[0], plain(image, context)[0])


def test_attention_maps_concatenated_onto_f2_f3(backbone):
    tokens = 3
    image, ctx = torch.rand(2, 3, 128, 128), _context(backbone, batch=2, tokens=tokens)
    with torch.no_grad():
        plain = backbone(image, ctx)
        feats = backbone(image, ctx, with_attention_maps=True)
    expected = [f["num_chs"] for f in backbone.feature_info(context_tokens=tokens)]
    c = [f["num_chs"] for f in backbone.feature_info()]
    assert [f.shape[1] for f in feats] == expected == [c[0], c[1] + tokens, c[2] + tokens, c[3]]
    for i in (1, 2):
        torch.testing.assert_close(feats[i][:, : c[i]], plain[i])  # the features themselves are unchanged
        maps = feats[i][:, c[i] :]
        torch.testing.assert_close(maps.sum(1), torch.ones_like(maps[:, 0]))  # means of softmax rows


def test_attention_maps_match_explicit_computation(backbone):
    """One layer's captured map equals softmax(QK^T) averaged over heads, computed by hand."""
    image, ctx = torch.rand(1, 3, 128, 128), _context(backbone, tokens=2)
    seen = {}
    # the five cross-attention layers at 1/32 of the image, whose mean map joins f3
    layer_names = [f"down_blocks.2.attentions.{i}" for i in range(2)]
    layer_names += [f"up_blocks.1.attentions.{i}" for i in range(3)]

    def keep_input(name):
        def hook(module, args, kwargs):
            seen[name] = args[0]

        return hook

    attn2 = {n: backbone.unet.get_submodule(n + ".transformer_blocks.0.attn2") for n in layer_names}
    handles = [attn2[n].register_forward_pre_hook(keep_input(n), with_kwargs=True) for n in layer_names]
    try:
        with torch.no_grad():
            feats = backbone(image, ctx, with_attention_maps=True)
            adapted = backbone.text_adapter(ctx)
            maps = []
            for n in layer_names:
                attn = attn2[n]
                q = attn.to_q(seen[n]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                k = attn.to_k(adapted).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                maps.append(((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1))
    finally:
        for h in handles:
            h.remove()
    c3 = backbone.feature_info()[2]["num_chs"]
    h, w = feats[2].shape[-2:]
    expected = torch.stack(maps).mean(0).transpose(1, 2).reshape(1, 2, h, w)
    torch.testing.assert_close(feats[2][:, c3:], expected, rtol=1e-4, atol=1e-5)


def test_probabilities_only_materialised_when_maps_requested(backbone, monkeypatch):
    from diffusers.models.attention_processor import Attention

    calls = []
    original = Attention.get_attention_scores
    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "get_attention_scores", counting)
    image, ctx = torch.rand(1, 3, 128, 128), _context(backbone)
    with torch.no_grad():
        backbone(image, ctx)
        assert calls == []
        backbone(image, ctx, with_attention_maps=True)
    # 15 cross-attention layers in down/up blocks; the 5 at 1/8 of the image exceed (side/16)^2 and are skipped
    assert len(calls) == 10


def test_gradients_reach_unet_and_adapter_not_vae(backbone):
    backbone.zero_grad(set_to_none=True)
    feats = backbone(torch.rand(1, 3, 128, 128), _context(backbone), with_attention_maps=True)
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.vae.parameters())
    assert backbone.unet.conv_in.weight.grad.abs().sum() > 0
    assert backbone.unet.up_blocks[3].resnets[2].conv2.weight.grad.abs().sum() > 0
    assert backbone.text_adapter.gamma.grad.abs().sum() > 0
    backbone.zero_grad(set_to_none=True)


def test_grad_checkpointing_gives_same_gradients(tiny_backbone_config):
    bb = VPDBackbone.from_config(tiny_backbone_config)
    image, ctx = torch.rand(1, 3, 128, 128), _context(bb)
    grads = []
    for enable in (False, True):
        bb.set_grad_checkpointing(enable)
        bb.zero_grad(set_to_none=True)
        sum(f.square().mean() for f in bb(image, ctx, with_attention_maps=True)).backward()
        grads.append(bb.unet.down_blocks[0].resnets[0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_text_adapter_and_class_embeddings():
    adapter = TextAdapter(8)
    torch.testing.assert_close(adapter.gamma, torch.full((8,), 1e-4))
    e = torch.randn(2, 3, 8)
    torch.testing.assert_close(adapter(e), e + adapter.gamma * adapter.fc(e))
    vectors = torch.randn(4, 8)
    table = ClassEmbeddings(vectors)
    out = table(torch.tensor([2, -1]))
    torch.testing.assert_close(out, torch.stack([vectors[2], vectors.mean(0)]))


def test_from_pretrained_folder_loads_its_weights(tiny_sd_dir, tiny_backbone_config):
    from diffusers import UNet2DConditionModel

    bb = VPDBackbone.from_config(dataclasses.replace(tiny_backbone_config, source="pretrained", path=str(tiny_sd_dir)))
    reference = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    torch.testing.assert_close(bb.unet.conv_in.weight, reference.conv_in.weight)
    assert bb.vae.decoder is None and "conv_out.weight" not in bb.unet.state_dict()


def test_single_file_equals_pretrained(tiny_sd_dir, tiny_sd_checkpoint, tiny_backbone_config):
    """Original-layout checkpoint -> diffusers' own conversion (config from the local folder, offline)."""
    cfg = dataclasses.replace(
        tiny_backbone_config, source="single_file", path=str(tiny_sd_checkpoint), config_path=str(tiny_sd_dir)
    )
    single = VPDBackbone.from_config(cfg).state_dict()
    pretrained = VPDBackbone.from_pretrained(str(tiny_sd_dir)).state_dict()
    assert single.keys() == pretrained.keys()
    for key in pretrained:
        if key.startswith(("unet.", "vae.")):
            torch.testing.assert_close(single[key], pretrained[key], msg=key)


def test_test_helper_inverse_layout_round_trips(tiny_sd_dir):
    """Guards tests/sd_layout.py: diffusers' converters map its original layout back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from sd_layout import to_original_checkpoint

    unet = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors")
    ckpt = to_original_checkpoint(unet, vae)
    configs = [json.loads((tiny_sd_dir / sub / "config.json").read_text()) for sub in ("unet", "vae")]
    pairs = ((unet, convert_ldm_unet_checkpoint(ckpt, configs[0])), (vae, convert_ldm_vae_checkpoint(ckpt, configs[1])))
    for original, converted in pairs:
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k], original[k]) for k in original)


def test_errors_name_the_bad_value(tmp_path, tiny_sd_dir, tiny_sd_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VPDBackbone.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion folder: missing unet/config.json"):
        VPDBackbone.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="needs config_path"):
        VPDBackbone.from_single_file(str(tiny_sd_checkpoint), None)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an original-layout SD v1 checkpoint.*model.diffusion_model"):
        VPDBackbone.from_single_file(str(tmp_path / "other.safetensors"), str(tiny_sd_dir))
    with pytest.raises(ValueError, match="source 'bogus' is not one of"):
        BackboneConfig(source="bogus")
    with pytest.raises(ValueError, match="needs a path"):
        BackboneConfig(source="pretrained")


def test_non_sd_unet_is_rejected():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, norm_num_groups=8,
        layers_per_block=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="UNet is not SD v1-shaped: down \\('CrossAttnDownBlock2D', 'DownBlock2D'\\)"):
        VPDBackbone(unet, AutoencoderKL(block_out_channels=(8,), norm_num_groups=8))


def test_deep_copy_keeps_its_own_taps(backbone):
    import copy

    twin = copy.deepcopy(backbone)
    image, ctx = torch.rand(1, 3, 128, 128), _context(backbone, tokens=2)
    with torch.no_grad():
        for a, b in zip(twin(image, ctx, with_attention_maps=True), backbone(image, ctx, with_attention_maps=True)):
            torch.testing.assert_close(a, b)
