"""Class embeddings and sentence tokens with a tiny CLIP text model + tokenizer built by the fixture."""

from __future__ import annotations

import pytest
import torch

from vpd_ray import embeddings
from vpd_ray.model.text import (
    ADE20K_CLASSES,
    IMAGENET_TEMPLATES,
    NYU_CLASSES,
    ClipText,
    compute_class_embeddings,
    load_class_embeddings,
)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return ClipText(str(tiny_clip_dir))


def test_builtin_lists():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert len(NYU_CLASSES) == 27 and "excercise_room" in NYU_CLASSES and NYU_CLASSES[-1] == "basement"
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150


def test_class_embedding_is_mean_pooled_output_over_templates(clip):
    templates = ("a photo of a {}.", "a bad photo of the {}.")
    vectors = compute_class_embeddings(["living_room", "cafe"], clip, templates=templates)
    assert vectors.shape == (2, 32)
    tokens = clip.tokenizer(
        ["a photo of a living room.", "a bad photo of the living room."],
        max_length=20, padding="max_length", truncation=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        pooled = clip.model(input_ids=tokens.input_ids).pooler_output
    torch.testing.assert_close(vectors[0], pooled.mean(0))
    assert not torch.allclose(vectors[0], vectors[1])


def test_cli_writes_loadable_file(tmp_path, tiny_clip_dir, capsys):
    names = tmp_path / "names.txt"
    names.write_text("chair\n\ntable\n")
    out = tmp_path / "emb" / "classes.safetensors"
    assert embeddings.main(["--clip", str(tiny_clip_dir), "--classes", str(names), "--out", str(out)]) == 0
    assert "2 classes x 32 dims" in capsys.readouterr().out
    vectors = load_class_embeddings(str(out), num_classes=2, dim=32)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["names"] == "chair\ntable"
    torch.testing.assert_close(vectors, compute_class_embeddings(["chair", "table"], ClipText(str(tiny_clip_dir))))


def test_cli_errors(tmp_path, tiny_clip_dir, capsys):
    assert embeddings.main(["--clip", str(tiny_clip_dir), "--classes", "coco", "--out", str(tmp_path / "x")]) == 2
    assert "neither a built-in set (nyu, ade20k) nor a file" in capsys.readouterr().err
    assert embeddings.main(["--clip", str(tmp_path / "none"), "--classes", "nyu", "--out", str(tmp_path / "x")]) == 2
    assert "cannot load a CLIP text model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="python -m vpd_ray.embeddings"):
        load_class_embeddings(str(tmp_path / "missing.safetensors"))
