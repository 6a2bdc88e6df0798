"""One guard for everything a command writes: checked before any work starts, so a run never
ends by destroying its own inputs or failing to save what it computed.

``prepare_output(path, reads=[...], overwrite=False, kind="folder" | "file", flag="--out")``
raises :class:`OutputError` (a ValueError whose message names the flag, the path and the
reason) when

- ``path`` is equal to, inside, or holds a folder or file in ``reads`` (the base, adapter or
  data the command reads) — ``overwrite`` does not lift this;
- ``path`` exists and is not empty (a folder with entries, or a file) and ``overwrite`` is false;
- ``path`` exists as the other kind (a file where a folder is wanted, or the reverse);
- ``path`` cannot be created or written: a regular file sits where one of its parents should
  be, or the nearest existing folder refuses a probe file (read-only, no permission).

It creates nothing (the probe file is removed at once) and returns ``Path(path)``.

Example::

    out = prepare_output(args.out, reads=[args.base, args.data], overwrite=args.overwrite)
    ...  # train
    model.save_pretrained(out)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output location that would overwrite, destroy an input, or cannot be written."""


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve(strict=False)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor)


def _check_reads(out: Path, shown: str, reads: Iterable, flag: str) -> None:
    for read in reads:
        if read is None or str(read) == "":
            continue
        source = _resolved(read)
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents:
            relation = "holds"
        else:
            continue
        raise OutputError(
            f"{flag} {shown} {relation} {read}, which this command reads: writing there would destroy "
            f"its input; choose another {flag}"
        )


def _probe(folder: Path, flag: str, shown: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".recpeft-write-probe.", dir=folder)
    except OSError as exc:
        raise OutputError(f"{flag} {shown} is not writable: {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def prepare_output(
    path: str | Path,
    *,
    reads: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    kind: str = "folder",
    flag: str = "--out",
) -> Path:
    """Check ``path`` as a ``kind`` output (see the module docstring); return it as a Path."""
    if kind not in ("folder", "file"):
        raise ValueError(f"prepare_output: kind must be 'folder' or 'file', got {kind!r}")
    if path is None or str(path).strip() == "":
        raise OutputError(f"{flag} is empty: name the {kind} to write")
    shown = str(path)
    if "\x00" in shown:
        raise OutputError(f"{flag} {shown!r} holds a NUL byte")
    target = Path(path).expanduser()
    out = _resolved(target)
    _check_reads(out, shown, reads, flag)
    if target.is_dir():
        if kind == "file":
            raise OutputError(f"{flag} {shown} is a folder; name a file to write")
        if any(target.iterdir()) and not overwrite:
            raise OutputError(
                f"{flag} {shown} already exists and is not empty; pass --overwrite to replace it, or choose "
                "another folder"
            )
        _probe(target, flag, shown)
        return Path(path)
    if target.exists():
        if kind == "folder":
            raise OutputError(f"{flag} {shown} is a file, not a folder")
        if not target.is_file():
            raise OutputError(f"{flag} {shown} exists and is not a regular file")
        if not overwrite:
            raise OutputError(f"{flag} {shown} already exists; pass --overwrite to replace it")
    existing = _nearest_existing(target.parent if target.exists() else target)
    if not existing.is_dir():
        raise OutputError(f"{flag} {shown} cannot be created: {existing} is a file, not a folder")
    _probe(existing, flag, shown)
    return Path(path)
