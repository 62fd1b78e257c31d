"""Depth's and seg's context modes (``tasks.<name>.context``): ``class`` (VPD, the default, unchanged),
``learned`` (MetaPrompts' prompt tokens: parameters with their own LR, in packages) and ``caption``
(EVP / TADP: the shard's ``txt`` through a frozen CLIP text model); each still learns on the samples."""

from __future__ import annotations

import copy
import io
import tarfile

import numpy as np
import pytest
import torch

from vpd_ray.tasks.depth import DepthConfig, DepthTask
from vpd_ray.tasks.seg import SegConfig, SegTask

DEPTH_TINY = {"crop_size": [128, 128], "head_dim": 16, "eigen_crop": False}  # the sample images are 128x128
SEG_TINY = {"num_classes": 6, "class_set": "synth_seg", "scale": [256, 64], "crop_size": [64, 64],
            "neck_channels": 16, "head_channels": 8}
LEARNED = {"context": "learned", "n_tokens": 4, "prompt_lr_mult": 10.0}
CAPTION = {"context": "caption", "text_encoder": "tiny", "max_tokens": 12}


def model_of(tasks, backbone_config):
    from vpd_ray.model.backbone import VPDBackbone
    from vpd_ray.modeling import VPDModel

    torch.manual_seed(0)
    return VPDModel(VPDBackbone.from_config(backbone_config), tasks)


# --- every mode: its context length, and class as it always was ------------------------------------

def test_default_is_the_class_context_with_the_papers_lengths(tiny_backbone_config):
    depth, seg = DepthTask(DepthConfig(**DEPTH_TINY)), SegTask(SegConfig(**SEG_TINY))
    assert depth.cfg.context == seg.cfg.context == "class"
    assert depth.context_tokens() == 1 and seg.context_tokens() == 6 and SegTask(SegConfig()).context_tokens() == 150
    assert depth.fields == DepthTask.fields and seg.fields == SegTask.fields  # no txt asked for
    model = model_of({"depth": depth, "seg": seg}, tiny_backbone_config)
    assert not hasattr(model.backbone, "prompts") and set(model.backbone.class_embeddings) == {"nyu", "synth_seg"}
    assert not any(n.startswith("backbone.prompts") for n in model.state_dict())


@pytest.mark.parametrize(("options", "tokens"), [(LEARNED, 4), (CAPTION, 12)])
def test_context_length_follows_the_mode_and_sizes_segs_attention_maps(tiny_backbone_config, options, tokens):
    depth, seg = DepthTask(DepthConfig(**DEPTH_TINY, **options)), SegTask(SegConfig(**SEG_TINY, **options))
    assert depth.context_tokens() == seg.context_tokens() == tokens
    model = model_of({"depth": depth, "seg": seg}, tiny_backbone_config)
    assert set(model.backbone.class_embeddings) == set()  # no class embeddings under the other modes
    channels = model.backbone.unet.config.block_out_channels
    assert [c.in_channels for c in model.heads["seg"].neck.lateral_convs] == [
        channels[0], channels[1] + tokens, channels[2] + tokens, channels[3]]
    batch = {"image": torch.rand(2, 3, 64, 64)}
    if options["context"] == "caption":
        assert seg.fields == SegTask.fields + ("txt",) and seg.inference_inputs == ("sentence",)
        batch["input_ids"] = seg.text_context.text.tokenize(["a circle on a wall", "rings above a floor"])
    context = seg.context(model.backbone, batch)
    assert context.shape == (2, tokens, model.backbone.text_dim)
    with torch.no_grad():
        assert model("seg", batch).shape == (2, 6, 64, 64)  # attention maps of T channels fit the head


@pytest.mark.parametrize(("override", "message"), [
    ("context=prompts", "tasks.depth.context: 'prompts' is not one of class, learned, caption"),
    ("n_tokens=0", "tasks.depth.n_tokens: 0 must be >= 1 with context: learned"),
    ("prompt_lr_mult=-1", "tasks.depth.prompt_lr_mult: -1.0 must be >= 0"),
    ("text_encoder=null", "tasks.depth.text_encoder: required with context: caption"),
    ("max_tokens=78", "tasks.depth.max_tokens: 78 must be in 2..77"),
])  # fmt: skip
def test_bad_context_options_are_one_line_config_errors(override, message):
    from vpd_ray.config import ConfigError, compose, task_config

    mode = "learned" if override.split("=")[0] in ("n_tokens", "prompt_lr_mult") else "caption"
    overrides = [f"tasks.depth.context={mode}", "tasks.depth.text_encoder=tiny", f"tasks.depth.{override}"]
    cfg = compose(base={"tasks": {"depth": {}}}, overrides=overrides)
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        task_config("depth", cfg.tasks.depth)


# --- learned: parameters with their own LR, trained, saved ------------------------------------------

def test_learned_prompts_are_parameters_with_their_lr_and_train(tiny_backbone_config):
    from vpd_ray.engine.optim import param_groups

    task = DepthTask(DepthConfig(**DEPTH_TINY, **LEARNED))
    model = model_of({"depth": task}, tiny_backbone_config)
    tokens = model.backbone.prompts["depth"].tokens
    assert tokens.shape == (4, model.backbone.text_dim) and tokens.requires_grad
    groups = param_groups(model.named_parameters(), 1e-3, 0.01, 0.1)
    plain = DepthTask(DepthConfig(**DEPTH_TINY))
    baseline = param_groups(model_of({"depth": plain}, tiny_backbone_config).named_parameters(), 1e-3, 0.01, 0.1)
    assert [g["group_name"] for g in groups] == [g["group_name"] for g in baseline] + ["lr_x10"]
    prompt_group = groups[-1]
    assert prompt_group["params"] == [tokens] and prompt_group["base_lr"] == pytest.approx(1e-2)
    assert prompt_group["weight_decay"] == 0.01
    assert all(tokens is not p for g in groups[:-1] for p in g["params"])
    assert copy.deepcopy(model).backbone.prompts["depth"].tokens.lr_mult == 10.0  # survives a copy

    before = tokens.detach().clone()
    optimizer = torch.optim.AdamW(groups)
    batch = {"image": torch.rand(2, 3, 64, 64), "depth": torch.rand(2, 1, 64, 64) * 5 + 0.5,
             "class_id": torch.tensor([0, 1])}
    ctx = task.context(model.backbone, batch)
    assert torch.equal(ctx[0], before) and torch.equal(ctx[1], before)  # the same tokens for every image
    task.loss(model("depth", batch), batch).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(tokens.detach(), before)


@pytest.mark.parametrize("mode", ["learned", "caption"])
def test_the_package_holds_the_prompts_and_names_the_text_model(tmp_path, mode):
    from test_export import SAMPLE_CONFIG

    from vpd_ray.config import compose, to_yaml
    from vpd_ray.modeling import architecture, build_model
    from vpd_ray.package import export_package, load_package

    options = ["tasks.depth.n_tokens=3"] if mode == "learned" else ["tasks.depth.text_encoder=tiny", "tasks.depth.max_tokens=6"]
    cfg = compose(SAMPLE_CONFIG, [f"tasks.depth.context={mode}", *options])
    model = build_model(cfg)
    if mode == "learned":
        with torch.no_grad():
            model.backbone.prompts["depth"].tokens.copy_(torch.arange(3 * 32, dtype=torch.float32).view(3, 32))
    export_package(model.state_dict(), to_yaml(cfg), architecture(model), str(tmp_path / "pkg"))
    loaded, loaded_cfg = load_package(str(tmp_path / "pkg"))
    assert loaded_cfg.tasks.depth.context == mode
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert ("backbone.prompts.depth.tokens" in loaded.state_dict()) == (mode == "learned")
    batch = {"image": torch.rand(2, 3, 64, 64)}
    if mode == "caption":  # the frozen text model is named by the config, rebuilt where the package loads
        batch["input_ids"] = model.tasks["depth"].text_context.text.tokenize(["a bedroom", "a kitchen"])
    torch.testing.assert_close(loaded.tasks["depth"].context(loaded.backbone, batch),
                               model.tasks["depth"].context(model.backbone, batch), rtol=0, atol=0)


# --- caption: the txt field, its ids, its context -----------------------------------------------------

def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_txt_is_decoded_as_the_caption_and_the_whitelist_still_refuses_the_rest():
    from vpd_ray.data.decode import (
        CorruptSampleError,
        ForbiddenFieldError,
        decode_sample,
        wanted_extensions,
    )
    from vpd_ray.data.synth import render_depth

    raw = {**render_depth(0, 0, (32, 32)), "txt": b" a bedroom with boxes\n"}
    sample = decode_sample(raw, "k", "u.tar", wanted_extensions(DepthTask.fields + ("txt",)))
    assert sample["caption"] == "a bedroom with boxes"
    without = {k: v for k, v in raw.items() if k != "txt"}
    assert "caption" not in decode_sample(without, "k", "u.tar", wanted_extensions(DepthTask.fields + ("txt",)))
    with pytest.raises(ForbiddenFieldError, match=r"field\(s\) \['pkl'\] are not in the decode whitelist"):
        decode_sample({**raw, "pkl": b"x"}, "k", "u.tar", wanted_extensions(DepthTask.fields + ("txt",)))
    with pytest.raises(CorruptSampleError, match="field txt: UnicodeDecodeError"):
        decode_sample({**raw, "txt": b"\xff\xfe"}, "k", "u.tar", wanted_extensions(("jpg", "txt")))


def test_two_captions_give_two_contexts_and_the_transforms_carry_their_ids(tiny_backbone_config):
    from vpd_ray.data.decode import decode_sample, wanted_extensions
    from vpd_ray.data.synth import render_depth

    task = DepthTask(DepthConfig(**DEPTH_TINY, **CAPTION))
    model = model_of({"depth": task}, tiny_backbone_config)
    clip = task.text_context.text.model(torch.device("cpu"))  # the task's, outside the module tree
    assert not any(p.requires_grad for p in clip.parameters())
    assert not {id(p) for p in clip.parameters()} & {id(p) for p in model.parameters()}
    assert not any("token_embedding" in k for k in model.state_dict())
    samples = []
    for i, caption in enumerate(["a bedroom with boxes on a checkered floor", "a kitchen with boxes on a checkered floor"]):
        raw = {**render_depth(0, i, (128, 128)), "txt": caption.encode()}
        samples.append(decode_sample(raw, f"k{i}", "u.tar", wanted_extensions(task.fields)))
    rng = np.random.default_rng(0)
    train = torch.utils.data.default_collate([task.train_transform(s, rng) for s in samples])
    evals = torch.utils.data.default_collate([task.eval_transform(s) for s in samples])
    assert train["input_ids"].shape == (2, 12) and torch.equal(train["input_ids"], evals["input_ids"])
    assert torch.equal(train["input_ids"][0], task.text_context.text.tokenize([samples[0]["caption"]])[0])
    context = task.context(model.backbone, evals)
    assert context.shape == (2, 12, model.backbone.text_dim)
    assert not torch.allclose(context[0], context[1])  # the captions differ in one word
    again = task.context(model.backbone, {"input_ids": evals["input_ids"][:1].repeat(2, 1)})
    assert torch.equal(again[0], again[1]) and torch.equal(again[0], context[0])
    with torch.no_grad():
        assert torch.isfinite(model.predict("depth", evals)).all()
    batch = task.inference_batch(torch.rand(1, 3, 128, 128), [{"meta": {}, "sentence": "a bedroom"}], protocol=True)
    assert batch["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="context: caption needs a caption per image"):
        task.inference_batch(torch.rand(1, 3, 128, 128), [{"meta": {}, "sentence": None}], protocol=False)


def test_shards_without_captions_are_a_clear_error_under_caption():
    from learning_loop import sample_urls

    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.errors import DataError

    task = DepthTask(DepthConfig(**DEPTH_TINY, **CAPTION))
    stream = build_stream(sample_urls("depth", "val"), task.eval_transform, train=False, batch_size=2,
                          fields=task.fields, num_workers=0)
    with pytest.raises(DataError, match=r"depth-val-000000\.tar, key synth_depth_s1_0000000: no caption \(txt "
                                        r"field\), which tasks\.depth\.context: caption reads; caption the shards "
                                        r"first: python -m vpd_ray\.captions"):
        next(iter(stream))


# --- learning on the synthetic samples (tests/learning_loop.py), depth with each new mode ------------

DEPTH_STEPS = 60


@pytest.fixture(scope="module")
def captioned_samples(tmp_path_factory):
    """The sample depth shards with a true caption per image (``SynthCaptioner``), where ``learning_loop``
    looks for shards."""
    from learning_loop import sample_urls

    from vpd_ray.data.captions import caption_shards
    from vpd_ray.data.synth import SynthCaptioner

    out = tmp_path_factory.mktemp("captioned")
    for split in ("train", "val"):
        caption_shards(sample_urls("depth", split), str(out), SynthCaptioner())
    return out


def assert_depth_learns(model, losses):
    from learning_loop import evaluate
    from test_multitask import mean_depth_baseline

    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses
    rmse, baseline = evaluate(model, "depth", max_batches=2)["rmse"], mean_depth_baseline(model)
    print(f"\ndepth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}")
    assert rmse < 0.95 * baseline, f"depth RMSE {rmse:.3f} vs mean-depth baseline {baseline:.3f}"


@pytest.mark.slow
def test_depth_learns_with_learned_prompts():
    from learning_loop import build, train

    model = build({"depth": DepthTask(DepthConfig(**DEPTH_TINY, **LEARNED))})
    before = model.backbone.prompts["depth"].tokens.detach().clone()
    losses = train(model, DEPTH_STEPS, lr=1e-3)
    assert not torch.equal(model.backbone.prompts["depth"].tokens.detach(), before)
    assert_depth_learns(model, losses)


@pytest.mark.slow
def test_depth_learns_with_captions(captioned_samples, monkeypatch):
    import learning_loop

    monkeypatch.setattr(learning_loop, "SAMPLE", captioned_samples)
    model = learning_loop.build({"depth": DepthTask(DepthConfig(**DEPTH_TINY, **CAPTION))})
    losses = learning_loop.train(model, DEPTH_STEPS, lr=1e-3)
    assert_depth_learns(model, losses)
