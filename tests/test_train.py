"""End-to-end training on the two-node Ray cluster with DeepSpeed: learning, a lost node, elastic worker
counts, export, ZeRO stages.

One module-scoped run of ``configs/sample.yaml`` feeds several tests, so DeepSpeed's op build and Ray's
start are paid once. It is a job submitted with ``ray job submit`` to the session's cluster, as a user
would, and elastic over its two 1-CPU nodes (``scaling.num_workers=[1, 2]``); the worker node is killed
after the first checkpoint: the run resumes on the head alone (1 worker, accumulation 2: the global batch
stays 8), grows back to 2 workers when a replacement node joins, and ends at its steps with a package;
the job ends SUCCEEDED and ``ray job logs`` shows the fault and the resumes. If a wait fails, the
failure carries what the job and the cluster were doing (:func:`_job_report`).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import wait_for_cpus, wait_for_idle_cluster
from vpd_ray.config import load
from vpd_ray.engine.console import ERRORS, EVENTS
from vpd_ray.engine.evaluation import evaluate_task
from vpd_ray.package import load_package
from vpd_ray.paths import SHARD_KEYS

pytestmark = pytest.mark.slow

MAX_STEPS, VAL_EVERY = 100, 40
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")


def _events(run_dir: str) -> str:
    path = os.path.join(run_dir, EVENTS)
    return open(path).read() if os.path.exists(path) else ""


def _wait_for(run_dir: str, pattern: str, timeout_s: float = 300, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in events.log past offset ``after`` (on timeout the fixture's
    failure shows events.log, with the rest of :func:`_job_report`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, _events(run_dir)[after:])
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in events.log after {timeout_s} s")


def _ray_job(ray_nodes, *args: str) -> subprocess.CompletedProcess:
    """``ray job ARGS --address <the session cluster's job API>``, as a user's shell runs it (no colour
    codes: its output goes into assertion messages)."""
    return subprocess.run([RAY_CLI, "job", args[0], "--address", ray_nodes.jobs_address, "--log-color", "false",
                           *args[1:]], capture_output=True, text=True, timeout=300)


def _job_status(ray_nodes, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_nodes.jobs_address).get_job_status(job_id).value


def _wait_for_job_end(ray_nodes, job_id: str, timeout_s: float = 600) -> str:
    """The job's status once it has ended, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (status := _job_status(ray_nodes, job_id)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(1)
    return status


@pytest.fixture(scope="module")
def sample_run(ray_nodes, ray_cluster, tmp_path_factory):
    """The sample training submitted with ``ray job submit`` to the two-node cluster, elastic over both
    nodes, the worker node lost after the first checkpoint and a replacement joining once the run has
    shrunk; returns (cfg, the job's logs, run dir, what happened when)."""
    storage = tmp_path_factory.mktemp("runs")
    config = os.path.join(REPO, "configs", "sample.yaml")
    overrides = [f"run.storage_path={storage}", "run.name=sample", f"train.max_steps={MAX_STEPS}",
                 f"train.val_every={VAL_EVERY}", "scaling.num_workers=[1,2]",
                 "scaling.elastic_resize_monitor_interval_s=2", "run.max_failures=4"]
    cfg = load(config, overrides)
    run_dir = os.path.join(str(storage), "sample")
    # No --working-dir: every node runs on this machine, with this venv's editable install of vpd_ray and
    # the repository's shards, as a cluster whose image has the package and whose nodes share the data
    # mount. The job then needs no package zipped, uploaded and unpacked on each node (the replacement
    # node too, before a worker can start there): fewer steps that can stall a start. `ray job submit
    # --working-dir .` itself is launchers/local.sh's path (tests/test_launch.py). The job's working
    # directory is the one its node's `ray start` had (here pytest's, by chance the repository): the
    # config and the shards go by absolute paths (load() made the config's relative shard paths absolute).
    shards = [f"tasks.depth.{key}={cfg.tasks.depth[key]}" for key in SHARD_KEYS]
    # Ray Train's first restart asks for the old size while the lost node's CPU still counts; it tries
    # fewer after this timeout (default 60 s; the job's environment reaches its controller).
    runtime_env = {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}}
    job_id = f"sample-{os.getpid()}"
    submitted = _ray_job(ray_nodes, "submit", "--submission-id", job_id, "--runtime-env-json",
                         json.dumps(runtime_env), "--no-wait", "--",
                         sys.executable, "-m", "vpd_ray.train", config, *overrides, *shards)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    try:
        _wait_for(run_dir, r"worker group: 2 workers on 2 nodes")
        _wait_for(run_dir, rf"checkpoint_{VAL_EVERY:08d}: ")
        killed_at = time.time()
        ray_nodes.kill_node(ray_nodes.workers[0])
        shrunk = _wait_for(run_dir, r"resuming from checkpoint \S+ at step (\d+) on 1 workers \(saved by 2\)")
        ray_nodes.add_node()  # the replacement
        wait_for_cpus(2)
        # Grown back: a 2-worker group again, resumed from the latest checkpoint (saved by the 1-worker group,
        # or still the 2-worker one if the small group had not reached a checkpoint yet).
        after = _events(run_dir).index(shrunk.group(0))
        _wait_for(run_dir, r"worker group: 2 workers on 2 nodes", after=after)
        grown = _wait_for(run_dir, r"resuming from checkpoint \S+ at step (\d+)\b(?! on 1 workers)", after=after + 1)
        status = _wait_for_job_end(ray_nodes, job_id)
        assert status == "SUCCEEDED", f"the job is {status}"
    except BaseException as err:
        err.add_note(_job_report(ray_nodes, job_id, run_dir))  # before the stop: what it was doing
        _abandon(ray_nodes, job_id)
        raise
    logs = _ray_job(ray_nodes, "logs", job_id).stdout
    return cfg, logs, run_dir, {"killed_at": killed_at, "shrunk": int(shrunk.group(1)), "grown": int(grown.group(1))}


def _tail(text: str, lines: int = 80) -> str:
    """The last lines: where a stalled run's log says what it waits for."""
    return "\n".join(text.splitlines()[-lines:])


def _output(proc: subprocess.CompletedProcess) -> str:
    """A CLI's stdout and stderr: its answer or the error that kept it from one."""
    return proc.stdout + proc.stderr


def _job_report(ray_nodes, job_id: str, run_dir: str) -> str:
    """What a failed or stalled job was doing, for the test's failure: gathered before the job is stopped
    and the test cluster deleted with Ray's session logs. The job's status and logs (the console says what
    a worker group waits for after 60 s), what the cluster has free and what holds or waits for it, the
    run's events, and the driver's and Ray Train controller's log files read from the head's session dir,
    which answer even when the job API does not. A part that cannot be had says why, and the rest follow."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    logs = os.path.join(ray_nodes.temp_dir, "session_latest", "logs")
    controllers = sorted(glob.glob(os.path.join(logs, "train", "ray-train-sys-controller-*.log")),
                         key=os.path.getmtime)
    parts = {
        "ray job status": lambda: _output(_ray_job(ray_nodes, "status", job_id)),
        "ray job logs (tail)": lambda: _tail(_output(_ray_job(ray_nodes, "logs", job_id))),
        "resources": lambda: f"{ray.available_resources()} free of {ray.cluster_resources()}",
        "nodes": lambda: "\n".join(f"{n['NodeID'][:8]} alive={n['Alive']} {n['Resources'].get('CPU', 0)} CPU"
                                   for n in ray.nodes()),
        "actors, not dead": lambda: "\n".join(f"{a.state} {a.class_name} on {(a.node_id or '-')[:8]}"
                                              for a in list_actors(filters=[("state", "!=", "DEAD")])),
        "placement groups, not removed": lambda: "\n".join(
            f"{g.state} {g.placement_group_id[:8]} bundles {[b['unit_resources'] for b in g.bundles]} on nodes "
            f"{[b['node_id'][:8] or '-' for b in g.bundles]}"
            for g in list_placement_groups(filters=[("state", "!=", "REMOVED")], detail=True)),
        EVENTS: lambda: _events(run_dir) or "(none yet)",
        f"job-driver-{job_id}.log (tail)": lambda: _tail(open(os.path.join(logs, f"job-driver-{job_id}.log")).read()),
        "Ray Train controller log (tail)": lambda: _tail(open(controllers[-1]).read()) if controllers else "(none)",
    }
    report = []
    for title, gather in parts.items():
        try:
            text = gather()
        except Exception as err:
            text = f"(unavailable: {err!r})"
        report.append(f"--- {title}\n{text.rstrip()}")
    return "\n".join(report)


def _checkpoint_metas(run_dir: str) -> dict[int, dict]:
    """step -> meta.json of every checkpoint left in the run directory."""
    metas = {}
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint_") and os.path.isfile(os.path.join(run_dir, name, "meta.json")):
            with open(os.path.join(run_dir, name, "meta.json")) as f:
                meta = json.load(f)
            metas[meta["step"]] = meta
    return metas


def _abandon(ray_nodes, job_id: str) -> None:
    """After a failed wait: stop the job and give the cluster back its two nodes, so that the module's
    other tests start on an idle cluster instead of queueing behind a run that goes on (Ray Train retries
    a worker group that cannot be placed without limit). This process is only a client of the cluster:
    the run's controller belongs to the job's driver, and ends with it (`ray job stop` waits for that)."""
    _ray_job(ray_nodes, "stop", job_id)
    if not ray_nodes.workers:
        ray_nodes.add_node()
    wait_for_cpus(2)
    wait_for_idle_cluster()


def _samples_taken(checkpoint_dir: str, task: str = "depth") -> int:
    """The samples a checkpoint's data position says the run has trained on: full epochs + marked ones."""
    from vpd_ray.data.pipeline import DataPosition

    with open(os.path.join(checkpoint_dir, "meta.json")) as f:
        position = DataPosition.from_dict(json.load(f)["data"][task])
    return position.floor * position.total + sum(position.taken(e) for e in position.seen)


def _val_stream(cfg, task, num_workers=0):
    from vpd_ray.data.pipeline import build_stream

    return build_stream(cfg.tasks.depth.val_shards, task.eval_transform, train=False, batch_size=8,
                        fields=task.fields, num_workers=num_workers, rank=0, world_size=1)


def _mean_depth_baseline(cfg, task) -> float:
    """Validation RMSE of predicting the mean training depth everywhere (same per-image averaging)."""
    from vpd_ray.data.pipeline import build_stream

    train = build_stream(cfg.tasks.depth.train_shards, task.eval_transform, train=False, batch_size=16,
                         fields=task.fields, num_workers=0, rank=0, world_size=1)
    depths = torch.cat([b["depth"][b["depth"] > 0] for b in train])
    mean = float(depths.mean())
    metric = task.metric()
    for batch in _val_stream(cfg, task):
        metric.update(torch.full_like(batch["depth"], mean), batch)
    return metric.compute()["rmse"]


def test_learns_below_mean_baseline(sample_run):
    cfg, _, run_dir, _ = sample_run
    model, _ = load_package(os.path.join(run_dir, "package"))
    baseline = _mean_depth_baseline(cfg, model.tasks["depth"])
    rmse = _checkpoint_metas(run_dir)[MAX_STEPS]["metrics"]["depth/rmse"]
    print(f"\nsample run: validation RMSE {rmse:.3f} vs predict-the-training-mean baseline {baseline:.3f}")
    assert rmse < 0.8 * baseline


def test_a_lost_node_shrinks_the_elastic_run_and_a_new_node_grows_it(sample_run):
    _, logs, run_dir, when = sample_run
    assert max(_checkpoint_metas(run_dir)) == MAX_STEPS
    # The client's view: `ray job logs` shows the fault, the resumes and the summary.
    assert "fault on worker rank" in logs and "resuming from checkpoint" in logs, logs[-3000:]
    assert f"[vpd] done: step {MAX_STEPS}/{MAX_STEPS} " in logs, logs[-3000:]
    events = _events(run_dir)
    assert "fault on worker rank" in events and "worker group: 1 workers on 1 nodes" in events  # on record
    assert when["shrunk"] == VAL_EVERY and when["grown"] >= when["shrunk"]  # at most val_every steps lost
    with open(os.path.join(run_dir, ERRORS)) as f:  # the fault's traceback, kept off the console
        assert f.read().startswith("--- ")
    # Exact data resume across the kill, the shrink and the growth: the final checkpoint's position holds
    # every sample the run's steps took (8 a step), so none was trained on twice in its epoch.
    assert _samples_taken(os.path.join(run_dir, f"checkpoint_{MAX_STEPS:08d}")) == MAX_STEPS * 8

    # Continuous steps and schedule: every log step is there, a repeated step logs the same LR.
    lrs = _tensorboard_events(run_dir, "train/lr")
    assert {step for _, step, _ in lrs} == set(range(10, MAX_STEPS + 1, 10))
    by_step: dict[int, set] = {}
    for _, step, lr in lrs:
        by_step.setdefault(step, set()).add(round(lr, 9))
    assert all(len(values) == 1 for values in by_step.values()), by_step
    # The loss carries on after each resume: no jump past the noise of the steady run.
    losses = _tensorboard_events(run_dir, "train/loss")
    before = [v for wall, s, v in losses if wall < when["killed_at"]]
    after = [v for wall, s, v in losses if wall > when["killed_at"] and s > when["shrunk"]][:2]
    assert after and max(after) < 1.5 * max(before[-3:]), (before, after)
    resumed_at = re.search(rf"^(\S+) resuming from checkpoint \S+ at step {when['shrunk']} on 1", events, re.M).group(1)
    resumed_wall = time.mktime(time.strptime(resumed_at, "%Y-%m-%dT%H:%M:%S"))
    first_after = min(wall for wall, s, _ in losses if wall >= resumed_wall and s > when["shrunk"])
    print(f"\nnode lost -> resumed on 1 worker {resumed_wall - when['killed_at']:.0f} s -> first logged step "
          f"{first_after - when['killed_at']:.0f} s; resumed at step {when['shrunk']}, grown back at step {when['grown']}")
    restart = re.compile(r"fault on worker rank|resuming from checkpoint|\[vpd\] done: ")
    print("`ray job logs`, the restarts:\n" + "\n".join(line for line in logs.splitlines() if restart.search(line)))


@pytest.fixture(scope="module")
def package_metrics(sample_run):
    """Validation metrics of the exported package, single process, fp32."""
    cfg, _, run_dir, _ = sample_run
    model, package_cfg = load_package(os.path.join(run_dir, "package"))
    assert package_cfg.deepspeed.zero_stage == 2
    task = model.tasks["depth"]

    def forward(images, batch):
        return model.forward_images("depth", images, batch)

    with torch.no_grad():
        return evaluate_task(task, forward, _val_stream(cfg, task), torch.device("cpu"))


def test_package_reproduces_run_metrics(sample_run, package_metrics):
    """fp32 package (consolidated ZeRO-2 shards + frozen VAE/class embeddings) ~ the bf16 run's RMSE."""
    best = min(meta["metrics"]["depth/rmse"] for meta in _checkpoint_metas(sample_run[2]).values())
    assert package_metrics["depth/rmse"] == pytest.approx(best, rel=0.05)


def test_export_cli_from_run_dir(sample_run, tmp_path):
    from safetensors.torch import load_file

    _, _, run_dir, _ = sample_run
    out = tmp_path / "pkg"
    proc = subprocess.run([sys.executable, "-m", "vpd_ray.export", run_dir, str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = load_file(out / "model.safetensors"), load_file(os.path.join(run_dir, "package", "model.safetensors"))
    assert ours.keys() == theirs.keys() and any(k.startswith("backbone.vae.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_distributed_evaluate_matches_single_process(sample_run, package_metrics):
    from vpd_ray.engine.eval_job import evaluate, seed_rows

    cfg, _, run_dir, _ = sample_run
    cfg = cfg.copy()
    cfg.data.num_workers = 0  # no loader processes to spawn for 32 images per worker
    distributed = evaluate(cfg, os.path.join(run_dir, "package"))  # 2 workers; test_shards = the val shard
    for key in ("depth/rmse", "depth/d1", "depth/abs_rel"):
        assert distributed[key] == pytest.approx(package_metrics[key], rel=1e-5)
    assert seed_rows(distributed)[0].startswith("depth: RMSE")
    assert seed_rows(distributed)[0].startswith("depth: RMSE")


def _stage_losses(loop_config):
    """Ray worker: 3 optimizer steps at ZeRO 0, 2 and 3 from the same init and the same batches."""
    from vpd_ray.config import from_container
    from vpd_ray.engine.evaluation import report_metrics
    from vpd_ray.engine.loop import Trainer

    losses = {}
    for stage in (0, 2, 3):
        cfg = from_container(loop_config["config"])
        cfg.deepspeed.zero_stage = stage
        trainer = Trainer(cfg, loop_config)
        iters = {name: iter(stream) for name, stream in trainer._streams().items()}
        losses[f"zero{stage}"] = [float(trainer.stepper.step(step, iters)) for step in range(3)]  # 3: two updates seen
        trainer.state.step = 100 * stage + 3  # a checkpoint directory per stage
        trainer.save_and_report({"stage": stage})
    report_metrics(losses)


def test_zero_stages_give_the_same_loss(ray_cluster, tmp_path):
    from ray import cloudpickle

    from vpd_ray.engine.train_job import torch_trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cfg = load("configs/sample.yaml", [f"run.storage_path={tmp_path}", "data.num_workers=0", "train.lr=1e-3"])
    result = torch_trainer(_stage_losses, {}, cfg, "zero").fit()
    metrics = result.metrics
    print("\nlosses per ZeRO stage:", {k: np.round(metrics[k], 4).tolist() for k in ("zero0", "zero2", "zero3")})
    for stage in ("zero2", "zero3"):
        np.testing.assert_allclose(metrics[stage], metrics["zero0"], rtol=1e-2)  # bf16 epsilon 2**-7
    # Each stage's checkpoint consolidates (ZeRO-3: from partitioned shards) into a loadable package
    # with the same weights, up to bf16 training noise; frozen VAE weights are identical.
    from vpd_ray.engine.checkpoint import export_checkpoint

    states = {}
    for checkpoint, reported in result.best_checkpoints:
        if "stage" in reported:
            package = export_checkpoint(checkpoint.path, str(tmp_path / f"package{reported['stage']}"))
            states[reported["stage"]] = load_package(package)[0].state_dict()
    assert sorted(states) == [0, 2, 3]
    for stage in (2, 3):
        for key, value in states[0].items():
            if key.startswith("backbone.vae."):
                assert torch.equal(states[stage][key], value), key
            elif value.is_floating_point():
                torch.testing.assert_close(states[stage][key], value, rtol=1e-2, atol=1e-3, msg=key)


def _tensorboard_events(run_dir: str, tag: str) -> list[tuple[float, int, float]]:
    """(wall time, step, value) of every ``tag`` scalar, restarts' repeats included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)]


def _tensorboard_scalars(run_dir: str, tag: str) -> dict[int, float]:
    return {step: value for _, step, value in _tensorboard_events(run_dir, tag)}


def test_resume_on_fewer_workers_continues_steps_and_schedule(ray_cluster, tmp_path):
    """A 2-worker ZeRO-2 run resumed on 1 worker: consolidated weights and a fresh optimizer, while the
    step count, the global batch (now 4 x 1 worker x 2 accumulation) and the LR schedule go on.
    Weights-only checkpoints land between the full ones as loadable packages."""
    from omegaconf import OmegaConf

    from vpd_ray.engine.optim import lr_factor
    from vpd_ray.engine.train_job import fit

    base = [f"run.storage_path={tmp_path}", "run.name=resize", "data.num_workers=0", "train.val_every=4",
            "train.log_every=2", "train.max_val_batches=1", "run.export=false", "train.checkpoint.weights_every=2"]
    first = fit(load("configs/sample.yaml", [*base, "train.max_steps=4"]))
    assert first.error is None, first.error
    cfg = load("configs/sample.yaml", [*base, "train.max_steps=8", "scaling.num_workers=1"])
    second = fit(cfg)
    assert second.error is None, second.error
    assert second.metrics["step"] == 8
    run_dir = os.path.join(str(tmp_path), "resize")
    with open(os.path.join(run_dir, EVENTS)) as f:
        events = f.read()
    assert "at step 4 on 1 workers (saved by 2): consolidated weights, fresh optimizer state" in events
    assert "depth data: epoch 0 of 256 samples, already trained on: 32 of epoch 0" in events
    assert _samples_taken(second.checkpoint.path) == 8 * 8  # the resumed part took none of the first 32 again
    assert "checkpoint_00000004: " in events and "written in" in events and "persisted in" in events
    lrs = _tensorboard_scalars(run_dir, "train/lr")
    schedule = OmegaConf.create(OmegaConf.to_container(cfg.train.schedule))
    for step in (6, 8):  # logged at step s: the LR of optimizer step s - 1, on the 8-step schedule
        assert lrs[step] == pytest.approx(cfg.train.lr * lr_factor(step - 1, 8, schedule, cfg.train.lr), rel=1e-6)
    weights = sorted(os.listdir(os.path.join(run_dir, "weights")))
    assert weights == ["step_00000002", "step_00000006"]  # weights_keep=2; steps 4 and 8 are full checkpoints
    model, _ = load_package(os.path.join(run_dir, "weights", "step_00000006"))
    assert any(k.startswith("backbone.vae.") for k in model.state_dict())


def test_validation_pictures_of_every_task_reach_tensorboard(ray_cluster, tmp_path):
    """The multitask sample: at each validation rank 0 draws train.log_images samples per task."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vpd_ray.engine.train_job import fit

    cfg = load("configs/sample_multitask.yaml", [f"run.storage_path={tmp_path}", "train.max_steps=2",
                                                 "train.val_every=2", "train.log_every=1", "train.max_val_batches=1",
                                                 "train.log_images=2", "data.num_workers=0", "run.export=false"])
    fit(cfg)
    events = EventAccumulator(os.path.join(str(tmp_path), cfg.run.name, "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = sorted(events.Tags()["images"])
    assert images == ["depth/val_0", "depth/val_1", "seg/val_0", "seg/val_1"]
    for tag in images:
        (event,) = events.Images(tag)
        assert event.step == 2 and event.width > 3 * event.height / 2  # image | truth | prediction (| error)


def test_paths_only_the_workers_see_are_checked_on_a_worker(ray_cluster, tmp_path, monkeypatch):
    """A head node without the data mount: the driver cannot see the shards, a worker node can."""
    from vpd_ray.config import ConfigError, deferred_checks
    from vpd_ray.preflight import check_on_worker

    cluster = tmp_path / "cluster-data"
    cluster.mkdir()
    for name in ("depth-train-000000.tar", "depth-train-000001.tar", "depth-train.manifest.json"):
        shutil.copy(os.path.join("shards", "sample", name), cluster / name)
    seen_by_driver = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: not str(p).startswith(str(cluster)) and seen_by_driver(p))
    shards = [f"tasks.depth.train_shards={cluster}/depth-train-{{000000..000001}}.tar"]
    with pytest.raises(ConfigError, match="shards not found"):
        load("configs/sample.yaml", shards)  # checked here, as without --remote-check
    cfg = load("configs/sample.yaml", shards, remote=(str(cluster),))
    assert check_on_worker(cfg, deferred_checks(cfg, remote=(str(cluster),))) == []
    typo = load("configs/sample.yaml", [f"tasks.depth.train_shards={cluster}/depth-trian-{{000000..000001}}.tar"],
                remote=(str(cluster),))
    assert check_on_worker(typo, deferred_checks(typo, remote=(str(cluster),))) == [
        f"tasks.depth.train_shards: 2 of 2 shards not found, first: {cluster}/depth-trian-000000.tar"]


def test_cli_missing_remote_path_is_one_line_and_exit_2(ray_cluster, tmp_path):
    missing = tmp_path / "cluster-data"
    proc = subprocess.run(
        [sys.executable, "-m", "vpd_ray.train", "configs/sample.yaml", f"run.storage_path={tmp_path}/runs",
         f"tasks.depth.train_shards={missing}/depth-train-{{000000..000001}}.tar", "--remote-check", str(missing)],
        capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [f"config error: tasks.depth.train_shards: 2 of 2 shards not found, first: "
                      f"{missing}/depth-train-000000.tar"], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # nothing written before the check
