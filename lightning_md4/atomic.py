"""Atomic, durable writes: a file or folder appears under its name whole or not at all.

Every writer that others may read while it writes (checkpoints, data caches, downloads, a sweep
trial's ``progress.json``) goes through here. The content is written under a temporary name in the
destination's own folder (so that the rename is never a copy across file systems), fsynced, renamed
onto the name with ``os.replace`` and the folder fsynced: a kill or a crash at any moment leaves the
old content or the new, never a torn file. A failed write removes its temporary file and leaves the
old content in place.

Temporary names are ``.NAME.PID.RANDOM.tmp``: hidden, and matched by no ``*.ckpt``, ``*.npy`` or
``*.bin`` glob. This module imports no torch (``md4-sweep report`` and the data caches use it).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for writing its new content."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def remove_stale(path: Path) -> None:
    """Remove the temporary files and folders that killed writes of ``path`` left beside it.

    Only for a path one process writes at a time (a checkpoint written by rank 0): a concurrent
    writer's temporary file would go too.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a crash of the machine."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some network file systems cannot fsync a folder; the rename is atomic anyway
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None,
                clean_stale: bool = False, durable: bool = True) -> Iterator[IO[Any]]:
    """An open file (``mode`` ``"wb"`` or ``"w"``) whose content replaces ``path`` when the block ends
    without an error; on an error ``path`` is left as it was.

    Creates the parent folders. ``clean_stale`` first removes what killed writes of ``path`` left
    (:func:`remove_stale`). ``durable=False`` skips the fsyncs (see :func:`atomic_path`).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a new file: mode 'wb' or 'w', not {mode!r}")
    with atomic_path(path, clean_stale=clean_stale, durable=durable) as tmp:
        # os.open applies the umask like a plain open would (mkstemp would make the file 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as file:
            yield file
        # atomic_path fsyncs the closed file before the rename


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, folder: bool = False, clean_stale: bool = False,
                durable: bool = True) -> Iterator[Path]:
    """A temporary name beside ``path`` for writers that open by name (``np.lib.format.open_memmap``),
    or with ``folder`` an empty temporary folder to fill; what is there when the block ends without an
    error is fsynced and renamed onto ``path``. On an error it is removed and ``path`` left as it was.

    A folder replaces an existing folder at ``path`` (a stale copy is removed first). If another
    process renames its own folder into place between that removal and the rename,
    ``FileExistsError`` is raised and ``path`` holds the other process's folder.

    ``durable=False`` renames without the fsyncs: still never torn for a reader, but a machine crash
    may lose the write. For files rewritten every second in a training loop (a sweep's progress),
    where two fsyncs per write would cost more than the file is worth.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale(path)
    tmp = temporary_name(path)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if folder:
            for sub, _, files in os.walk(tmp):
                for name in files:
                    _fsync_file(Path(sub, name))
                fsync_folder(Path(sub))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            try:
                os.replace(tmp, path)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "another process created it first", str(path)) from err
                raise
        else:
            if durable:
                _fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    if durable:
        fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8",
                 durable: bool = True) -> None:
    """``Path.write_text`` or ``write_bytes`` through :func:`atomic_file`."""
    if isinstance(data, bytes):
        with atomic_file(path, "wb", durable=durable) as file:
            file.write(data)
    else:
        with atomic_file(path, "w", encoding=encoding, durable=durable) as file:
            file.write(data)
