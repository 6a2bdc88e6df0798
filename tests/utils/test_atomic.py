"""Atomic writes: a failed write leaves the old file and no temporary behind; a written file gets
the permissions a plain open() would give it."""

import os

import pytest

from recpeft.utils.atomic import atomic_path, atomic_write_text


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_mode_follows_the_umask(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "y")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(plain).st_mode
