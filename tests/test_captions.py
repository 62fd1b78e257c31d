"""The captioning job (``python -m vpd_ray.captions``): a tiny random BLIP over tiny shard sets, on the
Ray cluster and in-process; the caption shards keep every source member and add a ``txt`` each, re-runs
skip finished shards, half-done sets are refused, and the training stream reads the captions."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from vpd_ray.data.captions import caption_shards, plan_captions, shard_keys
from vpd_ray.data.synth import SynthCaptioner, synth_items
from vpd_ray.data.tario import iter_raw_samples
from vpd_ray.data.writer import ConversionError, write_shards

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "room", "with", "boxes",
         "circles", "on", "wall", "floor", "red", "square"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A tiny random BLIP captioner (model + processor) saved as a local folder, as users pass --model."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    root = tmp_path_factory.mktemp("blip")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(root / "vocab.txt"), bos_token="[DEC]"))
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(WORDS), "max_position_embeddings": 64, "bos_token_id": 5, "eos_token_id": 3,
            "sep_token_id": 3, "pad_token_id": 0}
    vision = {**layers, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory):
    """12 synthetic seg samples in 3 shards of 4, with a manifest."""
    root = tmp_path_factory.mktemp("src")
    write_shards(synth_items("seg", 12, 0, (32, 32)), str(root), "seg-tiny", max_count=4, info={"dataset": "synth-seg"})
    return root


def pattern(root) -> str:
    return str(root / "seg-tiny-{000000..000002}.tar")


def members(url: str) -> list[tuple[str, bytes]]:
    with tarfile.open(url) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def assert_captioned_copy(src: str, dst: str) -> list[str]:
    """``dst`` holds ``src``'s members byte for byte plus one txt per sample; returns the captions."""
    source, out = members(src), members(dst)
    assert [m for m in out if not m[0].endswith(".txt")] == source
    captions = {name[:-len(".txt")]: data.decode() for name, data in out if name.endswith(".txt")}
    assert list(captions) == shard_keys(src)  # one caption per sample
    return list(captions.values())


@pytest.mark.slow
def test_caption_job_on_ray_captions_every_sample_and_reruns_cheaply(ray_cluster, blip_dir, seg_shards, tmp_path, capsys):
    from vpd_ray import captions

    out = tmp_path / "captioned"
    assert captions.main([pattern(seg_shards), "--model", str(blip_dir), "--out", str(out), "--batch-size", "3"]) == 0
    assert "3 shards, 3 written, 0 skipped (existing), 12 samples" in capsys.readouterr().out
    texts = [t for i in range(3) for t in assert_captioned_copy(str(seg_shards / f"seg-tiny-00000{i}.tar"),
                                                                 str(out / f"seg-tiny-00000{i}.tar"))]
    assert len(texts) == 12 and all(isinstance(t, str) for t in texts)
    manifest = json.loads((out / "seg-tiny.manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 12 and manifest["dataset"] == "synth-seg"
    assert manifest["captions"]["model"] == str(blip_dir) and manifest["captions"]["num_uncaptioned"] == 0

    # a re-run skips what is there: nothing at all, then only the shard that went missing
    stamp = os.stat(out / "seg-tiny-000000.tar").st_mtime_ns
    assert captions.main([pattern(seg_shards), "--model", str(blip_dir), "--out", str(out)]) == 0
    assert "3 shards, 0 written, 3 skipped (existing), 0 samples" in capsys.readouterr().out
    first = (out / "seg-tiny-000001.tar").read_bytes()
    os.remove(out / "seg-tiny-000001.tar")
    assert captions.main([pattern(seg_shards), "--model", str(blip_dir), "--out", str(out)]) == 0
    assert "3 shards, 1 written, 2 skipped (existing), 4 samples" in capsys.readouterr().out
    assert os.stat(out / "seg-tiny-000000.tar").st_mtime_ns == stamp
    assert (out / "seg-tiny-000001.tar").read_bytes() == first  # greedy decoding: the same captions again

    # the training stream reads them: caption ids in every batch, as the seg task tokenises them
    from vpd_ray.data.pipeline import build_stream
    from vpd_ray.tasks.seg import SegConfig, SegTask

    task = SegTask(SegConfig(num_classes=6, class_set="synth_seg", scale=[128, 32], crop_size=[32, 32],
                             context="caption", text_encoder="tiny", max_tokens=8))
    by_key = {key: fields["txt"].decode() for i in range(3) for key, fields in iter_raw_samples(str(out / f"seg-tiny-00000{i}.tar"))}
    stream = build_stream(str(out / "seg-tiny-{000000..000002}.tar"), task.train_transform, train=True, batch_size=4,
                          fields=task.fields, num_workers=0)
    batch = next(iter(stream))
    expected = task.text_context.text.tokenize([by_key[k] for k in batch["__key__"]])
    assert torch.equal(batch["input_ids"], expected)


def test_cli_refuses_bad_input_in_one_line(blip_dir, seg_shards, tiny_clip_dir, tmp_path, capsys):
    from vpd_ray import captions

    def run(*argv) -> str:
        assert captions.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("captions: ") and err.count("\n") == 1, err
        return err

    assert "not a local transformers model folder" in run(pattern(seg_shards), "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "'clip_text_model' model is no image-to-text model" in run(
        pattern(seg_shards), "--model", str(tiny_clip_dir), "--out", str(tmp_path / "o"))
    assert "not found" in run(str(tmp_path / "none-{000000..000001}.tar"), "--model", str(blip_dir), "--out", str(tmp_path / "o"))
    assert "is the shards' own folder" in run(pattern(seg_shards), "--model", str(blip_dir), "--out", str(seg_shards))
    with pytest.raises(SystemExit):
        captions.main([pattern(seg_shards), "--model", str(blip_dir), "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert not (tmp_path / "o").exists() or not any(n.endswith(".tar") for n in os.listdir(tmp_path / "o"))


def test_in_process_job_resumes_and_manifests_refuse_a_half_captioned_set(seg_shards, tmp_path):
    from vpd_ray.data.tario import shard_counts
    from vpd_ray.errors import DataError

    out = tmp_path / "captioned"

    class Interrupted(SynthCaptioner):
        calls = 0

        def __call__(self, samples):
            Interrupted.calls += 1
            if Interrupted.calls > 1:
                raise KeyboardInterrupt  # killed during the second shard
            return super().__call__(samples)

    with pytest.raises(KeyboardInterrupt):
        caption_shards(pattern(seg_shards), str(out), Interrupted(), batch_size=4)
    assert sorted(os.listdir(out)) == ["seg-tiny-000000.tar", "seg-tiny.manifest.json"]  # no temp file left
    with pytest.raises(DataError, match="incomplete conversion"):
        shard_counts([str(out / "seg-tiny-000000.tar")])
    plan = caption_shards(pattern(seg_shards), str(out), SynthCaptioner(), batch_size=4)
    assert [os.path.basename(j.dst) for j in plan.todo] == ["seg-tiny-000001.tar", "seg-tiny-000002.tar"]
    assert shard_counts([str(out / f"seg-tiny-00000{i}.tar") for i in range(3)]) == [4, 4, 4]
    texts = assert_captioned_copy(str(seg_shards / "seg-tiny-000002.tar"), str(out / "seg-tiny-000002.tar"))
    assert all(t.endswith("on a wall above a floor") for t in texts)  # the generator's true captions

    # a shard in --out written from other sources is stale: refused, nothing overwritten
    other = tmp_path / "other"
    write_shards(synth_items("seg", 4, 7, (32, 32)), str(other), "seg-tiny", max_count=4)
    os.replace(other / "seg-tiny-000000.tar", out / "seg-tiny-000000.tar")
    with pytest.raises(ConversionError, match="does not hold the samples of .*seg-tiny-000000.tar in order"):
        plan_captions(pattern(seg_shards), str(out), {})


def test_forbidden_fields_are_refused_before_writing(tmp_path):
    import io

    from vpd_ray.data.decode import ForbiddenFieldError
    from vpd_ray.data.synth import render_seg

    src = tmp_path / "bad-000000.tar"
    with tarfile.open(src, "w") as tar:
        for ext, data in {**render_seg(0, 0, (32, 32)), "pkl": b"\x80\x04"}.items():
            info = tarfile.TarInfo(f"k.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ForbiddenFieldError, match=r"key k: field\(s\) \['pkl'\] are not in the decode whitelist"):
        caption_shards(str(src), str(tmp_path / "out"), SynthCaptioner())
    assert not any(n.endswith(".tar") for n in os.listdir(tmp_path / "out"))
