"""``python -m vpd_ray.download``: which hub repos a config names, which files of them, once per node."""

import pytest

from vpd_ray.config import compose
from vpd_ray.download import DIFFUSERS_FILES, TRANSFORMERS_FILES, fetch_once_per_node, hub_repos, main


def test_hub_repos_of_the_shipped_configs():
    assert hub_repos(compose("configs/nyu.yaml")) == [
        ("model.backbone.path", "stable-diffusion-v1-5/stable-diffusion-v1-5", DIFFUSERS_FILES)]
    refer = hub_repos(compose("configs/refcoco.yaml"))
    assert [(key, repo) for key, repo, _ in refer] == [
        ("model.backbone.path", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("tasks.refer.text_encoder", "openai/clip-vit-large-patch14")]
    assert refer[1][2] == TRANSFORMERS_FILES
    assert hub_repos(compose("configs/sample_refer.yaml")) == []  # tiny backbone, built-in tiny CLIP
    # Only what the loaders read: not the multi-GB original checkpoints at the repo root.
    assert not any(p.endswith((".ckpt", ".bin")) or p == "*" for p in DIFFUSERS_FILES + TRANSFORMERS_FILES)


def test_cli_downloads_each_repo_into_the_cache(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_snapshot_download(repo, allow_patterns, cache_dir):
        calls.append((repo, tuple(allow_patterns), cache_dir))
        return str(tmp_path / repo)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    main(["configs/refcoco.yaml", "--cache-dir", str(tmp_path)])
    assert [c[0] for c in calls] == ["stable-diffusion-v1-5/stable-diffusion-v1-5", "openai/clip-vit-large-patch14"]
    assert all(c[2] == str(tmp_path) for c in calls)
    assert "tasks.refer.text_encoder: openai/clip-vit-large-patch14 ->" in capsys.readouterr().out


def test_cli_unreachable_hub_is_one_line_and_exit_1(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["configs/nyu.yaml"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "download error: Name or service not known"


@pytest.mark.parametrize("local_rank, fetched", [(0, True), (3, False)])
def test_training_fetches_once_per_node(monkeypatch, local_rank, fetched):
    """Local rank 0 downloads, every rank then meets the barrier (the others read the node's cache)."""
    events = []
    monkeypatch.setattr("vpd_ray.download.fetch", lambda cfg: events.append("fetch"))
    fetch_once_per_node(compose("configs/nyu.yaml"), local_rank, lambda: events.append("barrier"))
    assert events == (["fetch", "barrier"] if fetched else ["barrier"])
