"""``python -m vpd_ray.download CONFIG [key=value ...] [--cache-dir DIR]``: fetch a run's hub weights once.

Every hub id a config names (``model.backbone.path``, the refer task's ``text_encoder`` /
``tokenizer``) is downloaded into the Hugging Face cache (``--cache-dir``, else ``HF_HUB_CACHE`` /
``HF_HOME``), only the files the run loads: SD's ``unet/`` and ``vae/`` safetensors and configs, not
the 4-7 GB original checkpoints beside them. Point every node at that cache on shared storage
(``HF_HUB_CACHE=/shared/hf``) and set ``HF_HUB_OFFLINE=1``: the cluster then never touches the hub.

Without such a cache, training fetches each hub id once per node (local rank 0 downloads, the
node's other workers wait and then read the cache), not once per worker.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from omegaconf import DictConfig

# What the loaders read (diffusers prefers safetensors; transformers reads config, weights, tokenizer).
DIFFUSERS_FILES = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
TRANSFORMERS_FILES = ["*.json", "*.txt", "model.safetensors"]


def hub_repos(cfg: DictConfig) -> list[tuple[str, str, list[str]]]:
    """``(config key, repo id, file patterns)`` of every hub id in ``cfg``."""
    from vpd_ray.paths import config_paths, looks_like_hub_id

    repos = []
    for check in config_paths(cfg, need=()):
        if check.kind == "weights" and looks_like_hub_id(check.value):
            patterns = DIFFUSERS_FILES if check.probe == "model_index.json" else TRANSFORMERS_FILES
            repos.append((check.key, check.value, patterns))
    return repos


def fetch(cfg: DictConfig, cache_dir: str | None = None) -> list[str]:
    """Download every hub repo of ``cfg``; returns the local snapshot folders."""
    from huggingface_hub import snapshot_download

    return [snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir) for _, repo, patterns in hub_repos(cfg)]


def fetch_once_per_node(cfg: DictConfig, local_rank: int, barrier: Callable[[], None]) -> None:
    """Inside training: local rank 0 of each node fills the node's cache while the others wait.

    Every rank calls ``barrier`` exactly once (a collective), whether or not there is anything to fetch.
    """
    if local_rank == 0 and hub_repos(cfg):
        fetch(cfg)
    barrier()


def main(argv: list[str] | None = None) -> None:
    from vpd_ray.config import ConfigError, compose, exit_config_error
    from vpd_ray.errors import first_line

    parser = argparse.ArgumentParser(prog="python -m vpd_ray.download", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training YAML whose hub ids to fetch (e.g. configs/nyu.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--cache-dir", help="Hugging Face cache to fill (default: HF_HUB_CACHE / HF_HOME)")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.config, args.overrides)
    except ConfigError as err:
        exit_config_error(str(err))
    repos = hub_repos(cfg)
    if not repos:
        print("nothing to download: the config names no hub ids (only local paths)")
        return
    try:
        for (key, repo, _), folder in zip(repos, fetch(cfg, args.cache_dir)):
            print(f"{key}: {repo} -> {folder}")
    except Exception as err:  # the hub's many error types: unreachable, not found, gated
        print(f"download error: {first_line(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
