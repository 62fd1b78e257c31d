"""The driver's console while no worker group runs: Ray Train waits without limit for workers that do
not fit, and its own lines about it stay in the worker-side logs, so the console says what it waits for."""

import time

import pytest

from vpd_ray.config import load
from vpd_ray.engine import console
from vpd_ray.engine.train_job import waiting_line

pytestmark = pytest.mark.slow  # the session's Ray cluster


def test_the_console_says_what_a_worker_group_waits_for_until_it_runs(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(console, "WAIT_S", 1.0)
    monkeypatch.setattr(console, "REPEAT_S", 30.0)
    with console.Console(str(tmp_path), waiting=lambda: "waiting for the worker group") as run:
        time.sleep(2.0)  # no group yet: one line after WAIT_S
        console.started({console.KEY: run.handle})
        time.sleep(2.0)  # it runs: nothing
        run.handle.put.remote("[vpd] fault on worker rank 1: ActorDiedError", "Traceback ...")
        time.sleep(2.0)  # a fault: waiting for the restarted group again
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[vpd] waiting for the worker group",
                     f"[vpd] fault on worker rank 1: ActorDiedError (traceback: {tmp_path / console.ERRORS})",
                     "[vpd] waiting for the worker group"], lines


def test_the_waiting_line_names_the_demand_and_what_is_free(ray_cluster):
    line = waiting_line(load("configs/sample.yaml", ["scaling.num_workers=[1,3]"]))
    assert line.startswith("waiting for the worker group: at least 1 (up to 3) workers of CPU 1 each")
    assert "the cluster has CPU 2 of 2 free" in line, line
