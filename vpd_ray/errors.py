"""The two kinds of error, named in one place, and the one-line form every entry point prints.

- :class:`InputError`: deterministic. A bad config, data over its corruption limit, a forbidden
  shard field, a missing file, a non-finite loss under ``nan_policy: stop``. Running again gives
  the same error, so it stops the run at once (no Ray Train retry), prints one line and exits 2.
- Everything else raised in a worker is a fault (a lost node, a killed or OOM-killed process, a
  collective timeout): Ray Train restarts the worker group from the latest checkpoint, up to
  ``run.max_failures`` times.
"""

from __future__ import annotations


class InputError(Exception):
    """A deterministic error of the run's inputs; the message is one line naming what and where."""


class DataError(InputError):
    """Shards or files that cannot be used as they are: corrupt over the limit, forbidden fields,
    missing, incomplete conversions."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, else its type's name (libraries' messages
    run to many lines: omegaconf adds the key and object type, the hub its request details)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


class NonFiniteLossError(InputError):
    """A non-finite loss under ``train.nan_policy: stop`` (or past ``max_nan_skips``): the same data
    and weights give it again, so it is not retried."""


def original_message(err: BaseException) -> str:
    """The message ``err`` was raised with: a DataLoader worker's exception comes back to the main
    process with its traceback folded into the message ("Caught X in DataLoader worker process 0.
    Original Traceback ... X: message"); this unfolds it to the last line's message."""
    text = str(err)
    if "Original Traceback" not in text:
        return first_line(err)
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def fault_line(err: BaseException) -> str:
    """One line for a fault: the underlying exception's type and first line. Ray wraps a worker's
    exception (``RayTaskError``, whose message starts with the actor's name and pid and runs on with
    the traceback) and keeps the original as ``cause``."""
    while getattr(err, "cause", None) is not None and err.cause is not err:
        err = err.cause
    return f"{type(err).__name__}: {first_line(err)}"
