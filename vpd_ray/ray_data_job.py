"""An entry point's Ray Data job (``infer``, ``captions``): bad input is one line and exit 2 before any
Ray process starts, a caller's Ray connection (a notebook, a test) is kept, and the console holds the
job's own progress lines and summary, not Ray Data's INFO lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from vpd_ray.errors import InputError, first_line

Checked = TypeVar("Checked")


def quiet_ray_data() -> None:
    """Ray Data's own INFO lines (execution plan, and its progress where the console is no terminal: a
    dozen a job) go to its log file only. Its warnings, and its progress bars in a terminal, stay."""
    import ray.data  # noqa: F401 - configures its loggers on import

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session log file is no stream
            handler.setLevel(logging.WARNING)


def run_ray_data_job(name: str, check: Callable[[], Checked], job: Callable[[Checked], Any],
                     ray_address: str | None, num_cpus: int | None) -> tuple[int, Any]:
    """``(0, job(check()))``, or ``(2, None)`` after one ``name: reason`` line on stderr when ``check``
    refuses the input (a missing path, a bad value) or the job meets a deterministic input error (a
    refused shard: the same input would fail the same way)."""
    try:
        checked = check()
    except (FileNotFoundError, ValueError, InputError) as err:
        print(f"{name}: {first_line(err)}", file=sys.stderr)
        return 2, None
    import ray

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=ray_address, num_cpus=num_cpus, include_dashboard=False)
    quiet_ray_data()
    try:
        return 0, job(checked)
    except InputError as err:
        print(f"{name}: {first_line(err)}", file=sys.stderr)
        return 2, None
    finally:
        if own_ray:
            ray.shutdown()
