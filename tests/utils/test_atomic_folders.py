"""atomic_files: a set of files replaces its namesakes as one; a writer killed before any step of
the protocol leaves, after recover_folder, exactly the old set or exactly the new one."""

from __future__ import annotations

import os
import subprocess

import pytest

import recpeft.utils.atomic as atomic
from recpeft.utils.atomic import atomic_files, recover_folder

NAMES = ("weights.bin", "config.json", "vocab.json")
STEPS = ("mkdir", "rename", "replace", "rmdir", "fsync", "open")


def _write(folder, version: str) -> None:
    with atomic_files(folder) as tmp:
        for name in NAMES:
            (tmp / name).write_text(f"{version}:{name}")


def _version(folder) -> str:
    texts = {(folder / name).read_text() for name in NAMES}
    versions = {t.split(":")[0] for t in texts}
    assert len(versions) == 1, f"a mix: {sorted(texts)}"
    return versions.pop()


class _KillAt:
    """Stands in for the ``os`` module in recpeft.utils.atomic: dies (as SIGKILL would, without
    cleaning up) just before its ``at``-th file-system step."""

    def __init__(self, at: int):
        self.at, self.count = at, 0

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in STEPS:
            return real

        def step(*args, **kwargs):
            if self.count == self.at:
                os._exit(3)
            self.count += 1
            return real(*args, **kwargs)

        return step


def _killed_write(folder, at: int) -> bool:
    """Write version "new" over "old" in a child killed before step ``at``; True when it died."""
    pid = os.fork()
    if pid == 0:
        atomic.os = _KillAt(at)
        try:
            _write(folder, "new")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 3


def test_every_kill_point_leaves_old_or_new(tmp_path):
    seen = []
    for at in range(200):
        folder = tmp_path / f"k{at}"
        _write(folder, "old")
        died = _killed_write(folder, at)
        recover_folder(folder)
        seen.append(_version(folder))
        assert sorted(p.name for p in folder.iterdir()) == sorted(NAMES), f"debris after a kill at step {at}"
        if not died:
            break
    else:
        raise AssertionError("the write never finished")
    assert seen[-1] == "new" and seen[0] == "old" and len(seen) > 10
    assert seen == sorted(seen, key=lambda v: v == "new")  # old until the commit rename, new after


def test_a_failed_write_keeps_the_old_set_and_leaves_nothing(tmp_path):
    _write(tmp_path, "old")
    with pytest.raises(RuntimeError):
        with atomic_files(tmp_path) as tmp:
            (tmp / NAMES[0]).write_text("new:half")
            raise RuntimeError("disk full")
    assert _version(tmp_path) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)


def test_other_files_are_left_alone(tmp_path):
    (tmp_path / "DE").mkdir()
    (tmp_path / "DE" / "keep.txt").write_text("x")
    (tmp_path / "notes.txt").write_text("y")
    _write(tmp_path, "new")
    assert (tmp_path / "DE" / "keep.txt").read_text() == "x" and (tmp_path / "notes.txt").read_text() == "y"


def test_debris_of_dead_writers_is_removed_and_live_ones_kept(tmp_path):
    _write(tmp_path, "old")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".recpeft-tmp-{dead.pid}-0001").mkdir()
    (tmp_path / f".recpeft-tmp-{dead.pid}-0001" / NAMES[0]).write_text("new:half")
    (tmp_path / f".{NAMES[0]}.tmp-{dead.pid}-0002").write_text("half")
    live = tmp_path / f".recpeft-tmp-{os.getpid()}-0003"
    live.mkdir()
    recover_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*NAMES, live.name])
    assert _version(tmp_path) == "old"


def test_files_get_mode_0644_under_umask_022(tmp_path):
    before = os.umask(0o022)
    try:
        _write(tmp_path / "out", "new")
        atomic.atomic_write_text(tmp_path / "out" / "single.txt", "x")
    finally:
        os.umask(before)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {oct(0o644)}
