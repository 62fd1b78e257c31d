"""Many nodes for real, on the session's two-node cluster (tests/conftest.py ``ray_nodes``): a node lost
mid-run, and an elastic worker count that shrinks when it goes and grows back when a node joins."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from conftest import wait_for_cpus
from vpd_ray.config import load
from vpd_ray.engine.console import EVENTS

pytestmark = pytest.mark.slow

STEPS, VAL_EVERY = 28, 4


def _events(run_dir: str) -> str:
    path = os.path.join(run_dir, EVENTS)
    return open(path).read() if os.path.exists(path) else ""


def _wait_for(run_dir: str, pattern: str, timeout_s: float = 300, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in events.log past offset ``after``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, _events(run_dir)[after:])
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in events.log after {timeout_s} s:\n{_events(run_dir)}")


def _tensorboard(run_dir: str, tag: str) -> list[tuple[float, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)]


def test_a_lost_node_shrinks_an_elastic_run_and_a_new_node_grows_it(ray_nodes, ray_cluster, tmp_path, monkeypatch):
    """``scaling.num_workers=[1, 2]`` over two 1-CPU nodes: kill the worker node after the first
    checkpoint; the run resumes on the head alone (1 worker, accumulation 2: the global batch stays 8),
    then grows back to 2 workers when a replacement node joins, and ends at its steps with a package."""
    from vpd_ray.engine.train_job import fit

    # Ray Train's first restart asks for the old size, while the lost node's CPU still counts; it tries
    # fewer after this timeout (default 60 s; the driver's RAY_TRAIN_* variables reach the controller).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")

    cfg = load("configs/sample.yaml", [
        f"run.storage_path={tmp_path}", "run.name=elastic", "scaling.num_workers=[1,2]",
        "scaling.elastic_resize_monitor_interval_s=2", f"train.max_steps={STEPS}", f"train.val_every={VAL_EVERY}",
        "train.log_every=2", "train.max_val_batches=1", "data.num_workers=0", "run.max_failures=4"])
    run_dir = os.path.join(str(tmp_path), "elastic")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    runner.start()

    _wait_for(run_dir, r"worker group: 2 workers on 2 nodes")
    _wait_for(run_dir, rf"checkpoint_{VAL_EVERY:08d}: ")
    killed_at = time.time()
    ray_nodes.kill_node(ray_nodes.workers[0])
    shrunk = _wait_for(run_dir, r"resuming from checkpoint \S+ at step (\d+) on 1 workers \(saved by 2\)")
    mark = _events(run_dir).index(shrunk.group(0))
    ray_nodes.add_node()  # the replacement
    wait_for_cpus(2)
    grown = _wait_for(run_dir, r"resuming from checkpoint \S+ at step (\d+) on 2 workers \(saved by 1\)", after=mark)
    runner.join(timeout=600)
    assert not runner.is_alive() and outcome["result"].metrics["step"] == STEPS

    events = _events(run_dir)
    assert "fault on worker rank" in events  # the lost node's rank, on record
    assert re.search(r"worker group: 1 workers on 1 nodes", events)
    resumed = int(shrunk.group(1))
    assert resumed >= VAL_EVERY and int(grown.group(1)) >= resumed  # at most val_every steps lost each time
    assert os.path.isfile(os.path.join(run_dir, "package", "model.safetensors"))

    # Continuous steps and schedule: every log step is there; the LR follows the one schedule.
    lrs = _tensorboard(run_dir, "train/lr")
    assert {step for _, step, _ in lrs} == set(range(2, STEPS + 1, 2))
    by_step = {}
    for _, step, lr in lrs:
        by_step.setdefault(step, set()).add(round(lr, 9))
    assert all(len(values) == 1 for values in by_step.values()), by_step  # a repeated step logs the same LR
    # The loss carries on after each resume: no jump past the noise of the steady run.
    losses = _tensorboard(run_dir, "train/loss")
    before = [v for _, s, v in losses if s <= resumed]
    after = [v for wall, s, v in losses if wall > killed_at and s > resumed][:2]
    assert after and max(after) < 1.5 * max(before[-3:]), (before, after)
    resumed_wall = time.mktime(time.strptime(re.search(rf"^(\S+) resuming from checkpoint \S+ at step {resumed} on 1",
                                                      events, re.M).group(1), "%Y-%m-%dT%H:%M:%S"))
    first_after = min(wall for wall, s, _ in losses if wall >= resumed_wall and s > resumed)
    print(f"\nnode lost -> resumed on 1 worker {resumed_wall - killed_at:.0f} s -> first logged step "
          f"{first_after - killed_at:.0f} s; resumed at step {resumed}, grown back at step {grown.group(1)}")
