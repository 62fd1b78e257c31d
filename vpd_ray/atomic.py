"""Files that appear whole or not at all.

Every finished artefact (a shard, a manifest, a package's weights, an inference output, a report
page) is written through :func:`atomic_path`, so a killed job leaves the previous file or the new
one, never a truncated one, and "skip the outputs that exist" on a rerun never keeps half a file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

TMP_MARK = ".tmp-"  # <path>.tmp-<random>: what a killed writer leaves behind, and what its rerun removes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A new temporary path beside ``path``: renamed onto ``path`` when the block ends, removed when it raises.

    The temporary file is created empty with ``O_EXCL`` (concurrent writers never share one) and mode
    ``0o666 & ~umask``, what a plain ``open()`` gives: ``tempfile.mkstemp``'s 0600 would lock the
    other users of a shared folder out. It lives in the same folder, so the rename is atomic.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{TMP_MARK}{secrets.token_hex(6)}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str, prefix: str = "", suffix: str = "") -> None:
    """Delete the temporaries that killed writers left in ``folder`` for files named ``prefix*suffix``:
    never complete, so never kept (a SIGKILL skips :func:`atomic_path`'s own clean-up)."""
    for name in os.listdir(folder):
        if name.startswith(prefix) and f"{suffix}{TMP_MARK}" in name:
            os.remove(os.path.join(folder, name))


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` into ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
