"""The bad-input matrix of training and evaluation (README "When something is wrong"): a
deterministic error stops the run at once, without Ray Train's retries, as one line and exit 2;
existing outputs stay byte-identical. A killed worker is still a fault that is retried and
resumed (tests/test_train.py::test_a_lost_node_shrinks_the_elastic_run_and_a_new_node_grows_it)."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

pytestmark = pytest.mark.slow

SAMPLE = os.path.join("shards", "sample")
TRAIN = "depth-train-{000000..000001}.tar"


def _copy_train_shards(folder) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in ("depth-train-000000.tar", "depth-train-000001.tar", "depth-train.manifest.json"):
        shutil.copy(os.path.join(SAMPLE, name), os.path.join(folder, name))


def _rewrite_member(path, pick, data: bytes | None = None, extra: tuple[str, bytes] | None = None) -> None:
    """Rewrite shard ``path``: the first member ``pick`` selects gets ``data``; ``extra`` adds a member
    to that member's sample (``extra[0]`` is its extension)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    chosen = next(m.name for m, _ in members if pick(m.name))
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as out:
        for member, content in members:
            if member.name == chosen and data is not None:
                content = data
            if member.name == chosen and extra is not None:
                info = tarfile.TarInfo(f"{chosen.split('.', 1)[0]}.{extra[0]}")
                info.size = len(extra[1])
                out.addfile(info, io.BytesIO(extra[1]))
            member.size = len(content)
            out.addfile(member, io.BytesIO(content))


def truncated(folder) -> None:
    path = os.path.join(folder, "depth-train-000001.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 20 + 100)  # inside a member, a few samples in


def garbage_jpeg(folder) -> None:
    """The first image of each shard overwritten (every loader slot starts at a shard's first sample)."""
    for shard in ("depth-train-000000.tar", "depth-train-000001.tar"):
        _rewrite_member(os.path.join(folder, shard), lambda n: n.endswith(".jpg"), data=b"\xff\xd8garbage" * 50)


def forbidden_field(folder) -> None:
    """A pickle member in the first sample of each shard (refused, never unpickled)."""
    for shard in ("depth-train-000000.tar", "depth-train-000001.tar"):
        _rewrite_member(os.path.join(folder, shard), lambda n: n.endswith(".jpg"), extra=("pickle", b"\x80\x04K\x01."))


def _argv(tmp_path, overrides) -> list[str]:
    """The run's command-line arguments after ``python -m vpd_ray.train``."""
    return ["configs/sample.yaml", f"run.storage_path={tmp_path}/runs", "run.name=bad", "train.max_steps=6",
            "train.val_every=3", "train.max_val_batches=1", "data.max_corrupt=0",
            "data.shuffle_buffer=0",  # slots read their ranges in order: the spoiled first samples come first
            *overrides]


def _train(tmp_path, overrides, timeout=300):
    cmd = [sys.executable, "-m", "vpd_ray.train", *_argv(tmp_path, overrides)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("spoil, words", [(truncated, "depth-train-000001.tar"),
                                          (garbage_jpeg, "corrupt samples"),
                                          (forbidden_field, "pickle")], ids=["truncated", "garbage-jpeg", "forbidden"])
def test_bad_shard_stops_training_at_once_in_one_line(ray_head, tmp_path, spoil, words):
    shards = tmp_path / "shards"
    _copy_train_shards(shards)
    spoil(str(shards))
    proc, seconds = _train(tmp_path, [f"tasks.depth.train_shards={shards}/{TRAIN}"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    print(f"\n{spoil.__name__}: exit {proc.returncode} after {seconds:.0f} s: {errors}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("[vpd] plan: ")]
    assert len(console) <= 6 and "Traceback" not in proc.stdout + proc.stderr, console  # Ray's 2 lines, progress, the error
    events = (tmp_path / "runs" / "bad" / "events.log").read_text()
    assert "stopped, not retried" in events and "resuming" not in events  # no Ray Train retry


def _digests(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(root, n), folder): hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
            for root, _, files in os.walk(folder) for n in files}


def _assert_quiet_console(proc, steps: int, log_every: int, val_every: int) -> None:
    """The driver's console of a good run: the plan, one line when training starts, a progress line per
    log step, a line per validation, the summary; no worker output, no Ray Train report dicts, no
    tracebacks (``run.verbose`` would bring Ray's lines back)."""
    ours = [line for line in proc.stdout.splitlines()
            if not line.startswith("[vpd] plan: ") and "comm op" not in line]  # a cold op build is announced
    assert ours.pop(0) == f"[vpd] training: step 0/{steps} on 2 workers (2 nodes), 8 samples per step", ours
    progress = [line.split(" · ")[0] for line in ours if line.startswith("[vpd] step ") and " validation: " not in line]
    assert progress == [f"[vpd] step {s}/{steps}" for s in range(log_every, steps + 1, log_every)], ours
    assert sum(" validation: " in line for line in ours) == steps // val_every
    assert "ETA" in ours[0] and "depth/rmse" in ours[-2], ours
    assert ours[-1].startswith(f"[vpd] done: step {steps}/{steps}") and "best depth/rmse" in ours[-1], ours
    assert "model package: " in ours[-1] and len(ours) == len(progress) + steps // val_every + 1, ours
    everything = proc.stdout + proc.stderr
    for noise in ("RayTrainWorker", "TrainController", "Traceback", "TrainingReport", "FutureWarning"):
        assert noise not in everything, everything[-3000:]
    assert len(proc.stderr.splitlines()) <= 4, proc.stderr  # Ray's lines on connecting to the cluster


def _train_in_process(tmp_path, overrides, capsys) -> tuple[int, str, str]:
    """``python -m vpd_ray.train`` as :func:`_train` runs it, in this process: for the answers given before
    any Ray work starts (a finished run, a resume rule), which a new interpreter would spend its ~15 s of
    imports on. Returns (exit code, stdout, stderr)."""
    from vpd_ray import train

    capsys.readouterr()
    try:
        train.main(_argv(tmp_path, overrides))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_finished_run_is_not_silently_resumed_and_nothing_changes(ray_head, tmp_path, capsys):
    first, _ = _train(tmp_path, ["train.log_every=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    _assert_quiet_console(first, steps=6, log_every=2, val_every=3)
    before = _digests(tmp_path / "runs" / "bad")
    code, out, _ = _train_in_process(tmp_path, ["train.log_every=2"], capsys)
    assert code == 0 and "finished at step 6" in out and "Nothing to do" in out
    assert _digests(tmp_path / "runs" / "bad") == before
    code, out, err = _train_in_process(tmp_path, ["run.resume=never"], capsys)
    assert code == 2 and "run.resume=never" in err.strip().splitlines()[-1]
    assert "[vpd] plan:" not in out  # refused before the plan builds the model
    code, out, err = _train_in_process(tmp_path, ["run.name=fresh", "run.resume=must"], capsys)
    assert code == 2 and "has no checkpoint to resume" in err.strip().splitlines()[-1] and "[vpd] plan:" not in out
    assert _digests(tmp_path / "runs" / "bad") == before
