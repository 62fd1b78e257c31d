"""Files written whole or not at all: the one helper every artefact writer goes through."""

from __future__ import annotations

import os
import stat

import pytest

from vpd_ray.atomic import TMP_MARK, atomic_path, atomic_write


def test_a_finished_block_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # the folder is made
    atomic_write(target, b"old")
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and TMP_MARK in tmp  # beside it: an atomic rename
        assert target.read_bytes() == b"old"  # untouched until the block ends
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["out.bin"]


def test_a_failed_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, b"old")
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a killed worker's interrupt
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_block_that_removed_its_temporary_still_raises_its_own_error(tmp_path):
    with pytest.raises(ValueError, match="mine"):
        with atomic_path(tmp_path / "x") as tmp:
            os.unlink(tmp)
            raise ValueError("mine")


def test_concurrent_writers_get_their_own_temporaries_with_plain_open_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
            assert a != b
            assert stat.S_IMODE(os.stat(a).st_mode) == 0o644  # 0o666 & ~umask, not mkstemp's 0o600
    finally:
        os.umask(old)
