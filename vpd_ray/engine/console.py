"""The run's console on the driver: a few lines a user reads, not Ray's and DeepSpeed's start-up chatter.

Unless ``run.verbose`` is on, the driver connects with ``log_to_driver=False``: worker output
(DeepSpeed's banners, warnings, Ray Train's per-report lines, tracebacks) stays in Ray's log files.
What the user reads comes through one small actor instead:

- rank 0 puts its progress line per ``train.log_every``, one line per validation, and resumes;
- a Ray Train callback on the controller puts one line per worker fault, with its traceback, which
  the driver appends to ``<run dir>/errors.log`` rather than printing (the line also goes to
  ``<run dir>/events.log``, the run's record of starts, faults, resumes and checkpoints).

A driver thread prints the lines as they arrive. While no worker group runs (before the first
start, or after a fault until the restarted group's rank 0 calls :func:`started`) for ``WAIT_S``, it
says what the group waits for,
again every ``REPEAT_S``: Ray Train waits without limit for workers that do not fit, and its own
lines about it are worker-side output the quiet console leaves out. Where there is no console (a
Tune trial, a test calling the loop directly), :func:`say` logs through the worker's logger as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from vpd_ray.errors import fault_line

log = logging.getLogger(__name__)

KEY = "console"  # the actor handle's key in train_loop_config
ERRORS = "errors.log"
EVENTS = "events.log"
POLL_S = 0.5
WAIT_S, REPEAT_S = 60.0, 300.0  # say what a worker group waits for after this long, then this often


class Lines:
    """The actor: lines and fault tracebacks in arrival order, taken by the driver's thread."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str | None]] = []
        self.starts = 0  # worker groups that have started: :func:`started`

    def put(self, line: str, detail: str | None = None) -> None:
        self.items.append((line, detail))

    def start(self) -> None:
        self.starts += 1

    def take(self) -> tuple[list[tuple[str, str | None]], int]:
        items, self.items = self.items, []
        return items, self.starts


def on_driver_node(cls: type) -> Any:
    """``cls`` as a zero-CPU Ray actor pinned to the driver's node, like Ray Train's controller: a
    node lost mid-run must not take the run's bookkeeping actors with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls)


def started(loop_config: dict[str, Any]) -> None:
    """A worker group runs (its rank 0 calls this first): the console stops saying what it waits for."""
    handle = loop_config.get(KEY)
    if handle is not None:
        handle.start.remote()


def say(loop_config: dict[str, Any], line: str) -> None:
    """A worker's console line (rank 0's progress, validation, resume): to the driver's console when the
    run has one (fire and forget: a training step never waits on it), else to the worker's log."""
    handle = loop_config.get(KEY)
    if handle is None:
        log.info(f"[vpd] {line}")
    else:
        handle.put.remote(f"[vpd] {line}")


class ConsoleStream:
    """A text stream whose lines go to the run's console (:func:`say`): what a worker hands to
    :func:`vpd_ray.progress.progress` for its periodic lines (never a terminal, so plain lines)."""

    def __init__(self, loop_config: dict[str, Any]):
        self.loop_config, self.pending = loop_config, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            say(self.loop_config, line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class Console:
    """Driver side, around ``fit``: ``with Console(run_dir) as console: ... {KEY: console.handle}``.

    ``waiting()``: the line to say while no worker group runs (what it needs, what the cluster has)."""

    def __init__(self, run_dir: str, waiting: Callable[[], str] | None = None):
        self.run_dir, self.errors = run_dir, os.path.join(run_dir, ERRORS)
        self.waiting, self._waiting_since = waiting, time.monotonic()  # None while a worker group runs
        self._starts = 0
        self.handle: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="vpd-console", daemon=True)

    def __enter__(self) -> "Console":
        import ray

        self.handle = on_driver_node(Lines).remote()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self._print(*ray.get(self.handle.take.remote()))
        ray.kill(self.handle)

    def _pump(self) -> None:
        import ray

        while not self._stop.wait(POLL_S):
            self._print(*ray.get(self.handle.take.remote()))
            self._say_if_waiting()

    def _say_if_waiting(self) -> None:
        if self.waiting is None or self._waiting_since is None or time.monotonic() - self._waiting_since < WAIT_S:
            return
        print(f"[vpd] {self.waiting()}", flush=True)
        self._waiting_since = time.monotonic() + REPEAT_S - WAIT_S  # the next one in REPEAT_S

    def _print(self, items: list[tuple[str, str | None]], starts: int) -> None:
        if starts > self._starts:
            self._starts, self._waiting_since = starts, None
        for line, detail in items:
            if detail is not None:  # a fault: on record in events.log, its traceback in errors.log
                self.record(detail)
                append_event(self.run_dir, line.removeprefix("[vpd] "))
                line = f"{line} (traceback: {self.errors})"
                self._waiting_since = time.monotonic()  # until the restarted group runs
            print(line, flush=True)

    def record(self, text: str) -> None:
        """Append a traceback (or any long text) to ``<run dir>/errors.log``, timestamped."""
        os.makedirs(os.path.dirname(self.errors), exist_ok=True)
        with open(self.errors, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')}\n{text.rstrip()}\n")


def append_event(run_dir: str, line: str) -> None:
    """One timestamped line in ``<run dir>/events.log``: starts, faults, resumes, checkpoints, stops."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, EVENTS), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def traceback_of(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def fault_lines(handle: Any, max_failures: int) -> Any:
    """The Ray Train callback (it runs on the controller) that puts one console line per failed worker."""
    from ray.train import UserCallback

    class FaultLines(UserCallback):
        failures = 0

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            self.failures += 1
            left = max_failures - self.failures
            then = (f"Ray Train restarts the workers from the latest checkpoint (restarts left after this one: "
                    f"{left} of run.max_failures={max_failures})" if left >= 0 or max_failures < 0 else
                    f"no restarts left (run.max_failures={max_failures})")
            for rank, error in sorted(worker_exceptions.items()):
                handle.put.remote(f"[vpd] fault on worker rank {rank}: {fault_line(error)}; {then}",
                                  traceback_of(error))

    return FaultLines()
