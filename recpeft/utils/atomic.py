"""Writing files so that a crash never leaves a half-written one, and folders of files so that a
crash never leaves a mix of two versions.

One file (:func:`atomic_path`): write a temporary ``.<name>.tmp-<pid>-<random>`` in the same
folder, flush it to disk, then rename it over the target (an atomic step on POSIX).

A set of files in one folder (:func:`atomic_files`), a redo journal kept inside the folder:

1. the files are written into ``<folder>/.recpeft-tmp-<pid>-<random>/`` and flushed to disk
   (files and journal folder);
2. commit: that folder is renamed ``.recpeft-new-<pid>-<random>`` — one atomic rename; from here
   on the new version is the folder's version;
3. roll forward: each journal file is renamed over its target (``os.replace``), then the empty
   journal folder is removed.

Every kill point leaves the old version or the new one. Killed before the commit rename: the
targets are untouched (old) and the ``.recpeft-tmp-*`` folder is debris. Killed after it: the
committed journal holds every new file not yet moved; :func:`recover_folder` — run by the next
writer and by every loader before it reads — finishes step 3 (idempotent: a file already moved is
simply no longer in the journal), so the folder reads as exactly the new version. Debris of a
killed write (``.recpeft-tmp-*`` folders, ``.<name>.tmp-*`` files) is removed by the same call
once its writer's process is gone. Files not in the set (other adapters' sub-folders, a base
fingerprint) are never touched. Files get the mode a plain ``open()`` gives (0666 less the umask).
Concurrent writers to one folder are not supported; a reader racing a writer may see a mix.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

JOURNAL_TMP = ".recpeft-tmp-"
JOURNAL_NEW = ".recpeft-new-"
_TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_JOURNAL_TMP = re.compile(rf"^{re.escape(JOURNAL_TMP)}(\d+)-[0-9a-f]+$")


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a writer of that pid may still be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error
    removed. The caller writes the whole file to the yielded path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{_token()}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the mode open() gives: 0666 less umask
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _roll_forward(directory: Path, journal: Path) -> None:
    """Step 3 of the protocol: move every file of the committed ``journal`` over its target."""
    try:
        names = sorted(os.listdir(journal))
    except FileNotFoundError:  # another process finished it
        return
    for name in names:
        try:
            os.replace(journal / name, directory / name)
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    try:
        os.rmdir(journal)
    except FileNotFoundError:
        pass
    _fsync_dir(directory)


def recover_folder(directory: str | Path) -> None:
    """Finish a committed save of ``directory`` that was killed half-way (so it reads as that new
    version) and remove the debris of killed writes whose process is gone. Run before every read
    and write of a folder saved by :func:`atomic_files`; a folder that does not exist is left
    alone. Raises OSError naming the folder when a committed save cannot be finished (no write
    access)."""
    directory = Path(directory)
    try:
        entries = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in entries:
        path = directory / name
        if name.startswith(JOURNAL_NEW):
            try:
                _roll_forward(directory, path)
            except OSError as exc:
                raise OSError(
                    f"{directory} holds an unfinished save ({name}) that cannot be completed without write "
                    f"access: {exc.strerror or exc}"
                ) from None
        elif (match := _JOURNAL_TMP.match(name)) and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
        elif (match := _TEMP_FILE.match(name)) and not _alive(int(match.group(1))) and path.is_file():
            try:
                path.unlink(missing_ok=True)
            except OSError:  # debris in a read-only folder does no harm to a reader
                pass


@contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; write the whole set of files (flat names) into it. On success
    they replace their namesakes in ``directory`` as one set (see the module docstring for the
    protocol); on error nothing in ``directory`` changes and the temporary folder is removed.

    Example::

        with atomic_files("runs/base") as tmp:
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "model_config.json").write_text(text)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover_folder(directory)
    token = _token()
    tmp, new = directory / f"{JOURNAL_TMP}{token}", directory / f"{JOURNAL_NEW}{token}"
    os.mkdir(tmp)
    try:
        yield tmp
        for entry in os.scandir(tmp):
            if not entry.is_file(follow_symlinks=False):
                raise ValueError(f"{tmp / entry.name}: atomic_files takes plain files only")
            _fsync_file(Path(entry.path))
        _fsync_dir(tmp)
        os.rename(tmp, new)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    _roll_forward(directory, new)
