"""Input errors stop a Ray Train run at once; faults are retried.

Ray Train restarts the worker group after any worker error, up to ``run.max_failures``: right for a
lost node, wrong for a corrupt shard, which fails again on every attempt (and prints its traceback
each time). So workers that hit an :class:`~vpd_ray.errors.InputError` (every rank at once: see
:mod:`vpd_ray.engine.collectives`) leave their message in a small actor the driver created and
return normally; the driver reads it after ``fit`` and raises it, one line. Any other exception
is a fault and goes to Ray Train's retries as before.
"""

from __future__ import annotations

from typing import Any, Callable

from vpd_ray.errors import InputError, original_message

KEY = "input_errors"  # the actor handle's key in train_loop_config


class FirstMessage:
    """Keeps the first message put (every rank of a stopped group puts the same one)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def put(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str | None:
        return self.message


def fit(make_trainer: Callable[[dict[str, Any]], Any]) -> Any:
    """``make_trainer(loop_extra).fit()`` with an error actor in ``loop_extra``; raises the workers'
    InputError on the driver (after the workers have returned), else returns the Ray Train result."""
    import ray

    from vpd_ray.engine.console import on_driver_node

    box = on_driver_node(FirstMessage).remote()
    try:
        result = make_trainer({KEY: box}).fit()
        message = ray.get(box.get.remote())
    finally:
        ray.kill(box)
    if message:
        raise InputError(message)
    return result


def run_worker(loop_config: dict[str, Any], body: Callable[[], None]) -> None:
    """A worker's ``body()``; an InputError is handed to the driver's actor instead of Ray Train's retries
    (re-raised where there is no actor, e.g. a Tune trial, whose failure Tune reports)."""
    import ray

    try:
        body()
    except InputError as err:
        box = loop_config.get(KEY)
        if box is None:
            raise
        ray.get(box.put.remote(original_message(err)))
