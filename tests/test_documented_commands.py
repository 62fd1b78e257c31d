"""Every `train` / `tune` / `evaluate` command that README.md, launchers/ and the config comments show
passes ``--dry-run``: the commands are read from those files (not copied here), so docs and code
cannot drift apart. The cluster's files are stand-ins: ``/data`` and ``/shared`` are marked for the
worker-side check (``--remote-check``), and the hub ids resolve from a local Hugging Face cache that
holds only the configs, with the hub offline, as on a cluster whose cache ``vpd_ray.download`` filled.
"""

import json
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "launchers/README.md", "launchers/aws-p4d.yaml", "launchers/rayjob.yaml",
        "launchers/slurm.sbatch", "launchers/local.sh"] + [f"configs/{n}" for n in sorted(os.listdir(os.path.join(REPO, "configs")))]
# How each documented launcher reaches an entry point (local.sh and slurm.sbatch run `vpd_ray.train "$@"`).
LAUNCHERS = {"python -m vpd_ray.train": "train", "python -m vpd_ray.tune": "tune",
             "python -m vpd_ray.evaluate": "evaluate", "launchers/local.sh": "train",
             "launchers/slurm.sbatch": "train"}
COMMAND = re.compile("(" + "|".join(map(re.escape, LAUNCHERS)) + r")\s+(.*)")
OPTIONAL = re.compile(r"\s\[(?:--|key=)[^\]]*\]")  # "[--out metrics.json]", "[key=value ...]"
CLUSTER_PATHS = ["/data", "/shared"]


def _logical_lines(path: str) -> list[tuple[int, str]]:
    """``(first line number, line)`` with comment markers stripped and backslash continuations joined."""
    out, pending, start = [], "", None
    with open(os.path.join(REPO, path)) as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip().lstrip("#").strip()
            start = start or number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            out.append((start, pending + line))
            pending, start = "", None
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, entry point, argv)`` of every documented command that names a shipped config."""
    found = []
    for path in DOCS:
        for number, line in _logical_lines(path):
            for match in COMMAND.finditer(line):
                rest = OPTIONAL.sub("", match.group(2).split("`")[0])
                argv = []
                for token in shlex.split(rest, comments=True):
                    if token in ("&&", "|", ";", "&", ">"):
                        break
                    argv.append(token)
                if argv and argv[0].startswith("configs/"):  # not "CONFIG", "$@" or a generated best.yaml
                    found.append((f"{path}:{number}", LAUNCHERS[match.group(1)], argv))
    return found


def _cache_entry(cache, repo: str, files: dict[str, dict]) -> None:
    """A Hugging Face hub cache entry (refs/main -> snapshots/<rev>/...) holding only ``files``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / "0000000000000000000000000000000000000000"
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps(content))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(snapshot.name)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    sd15 = os.path.join(REPO, "vpd_ray", "model", "sd15")
    configs = {part: json.load(open(os.path.join(sd15, f"{part}_config.json"))) for part in ("unet", "vae")}
    _cache_entry(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 {"model_index.json": {}, "unet/config.json": configs["unet"], "vae/config.json": configs["vae"]})
    _cache_entry(tmp_path, "openai/clip-vit-large-patch14", {"config.json": {}})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: True)
    return tmp_path


def test_the_docs_show_cluster_commands():
    commands = documented_commands()
    where = {w for w, _, _ in commands}
    assert len(commands) >= 25 and any(w.startswith("launchers/") for w in where), commands
    for config in ("configs/nyu.yaml", "configs/ade20k.yaml", "configs/refcoco.yaml"):
        assert any(argv[0] == config and "scaling.num_workers=16" in argv for _, _, argv in commands), config


@pytest.mark.parametrize("where, entry, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_passes_dry_run(where, entry, argv, offline_hub_cache, tmp_path, capsys):
    import importlib

    argv = list(argv)
    if "--checkpoint" in argv:  # a placeholder (RUN_DIR) or a file of the user's
        argv[argv.index("--checkpoint") + 1] = str(tmp_path)
    extra = ["--dry-run"] + [f"--remote-check={p}" for p in CLUSTER_PATHS]
    main = importlib.import_module(f"vpd_ray.{entry}").main
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, f"{where}: {shlex.join(argv)}\n{err}"
    assert "[vpd] dry run: config valid" in out
    if entry != "evaluate":
        assert "[vpd] plan: batch: " in out and "[vpd] plan: checkpoint: ~" in out, out
