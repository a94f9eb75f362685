r"""Files that survive a crash: one atomic writer, and the checks that run before any work.

Every result, report, checkpoint and figure the experiments write goes through
:func:`atomic_write`: the bytes go to a temporary file beside the target, are flushed and
fsynced, the file is moved into place with :func:`os.replace`, and the folder is fsynced.
A process killed at any moment leaves either the previous file or the new one, never a
torn one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "fsync_dir", "unwritable"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened).

    Parameters
    ----------
    folder : path
        The folder whose entries (e.g. a file just moved in by :func:`os.replace`) should
        reach the disk. Where it cannot be opened (a platform without directory file
        descriptors, or a folder that does not exist) nothing happens.

    Examples
    --------
    >>> import tempfile
    >>> from manifold_nets.experiments.io import fsync_dir
    >>> fsync_dir(tempfile.mkdtemp()) is None
    True
    >>> fsync_dir("/no/such/folder") is None
    True
    """
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], object]
                 ) -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    Parameters
    ----------
    path : path
        The target file; its folder must exist.
    data : str, bytes or callable
        The content: text (UTF-8), bytes, or a function that writes into the binary file
        object it is given (e.g. ``lambda fh: torch.save(obj, fh)``).

    Returns
    -------
    pathlib.Path
        The target file.

    Notes
    -----
    Setting ``MANIFOLD_NETS_FAULT_WRITE_PAUSE`` to a number of seconds makes every write of
    text pause half-way and again before the rename, so that the fault-injection tests can
    kill a process inside a write. It is off unless the variable is set.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from manifold_nets.experiments.io import atomic_write
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "record.json"
    >>> atomic_write(target, '{"ok": true}\\n').read_text()
    '{"ok": true}\\n'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pause = float(os.environ.get("MANIFOLD_NETS_FAULT_WRITE_PAUSE") or 0)
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                raw = data.encode() if isinstance(data, str) else data
                if pause:
                    fh.write(raw[: len(raw) // 2])
                    fh.flush()
                    time.sleep(pause)
                    raw = raw[len(raw) // 2 :]
                fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def unwritable(path: str | os.PathLike, option: str, *, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or a folder with ``folder=True``) cannot be written, or ``None``.

    Creates the folder if needed and writes and removes a probe file in it, so that a
    command fails before any training rather than after it.

    Parameters
    ----------
    path : path
        The file that will be written (its folder is probed), or the folder itself when
        ``folder`` is true.
    option : str
        The command-line option that named ``path`` (e.g. ``"--out"``), quoted in the
        message.
    folder : bool, optional
        Whether ``path`` is a folder rather than a file (default ``False``).

    Returns
    -------
    str or None
        ``None`` when ``path`` can be written; otherwise a message that names ``option``
        and ``path``, says what is wrong and how to fix it.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from manifold_nets.experiments.io import unwritable
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> unwritable(root / "new" / "out.json", "--out") is None
    True
    >>> (root / "new").is_dir()
    True
    >>> print(unwritable(root, "--out"))  # doctest: +ELLIPSIS
    cannot write --out ...: it is a folder. Fix: pass a file name.
    >>> unwritable("/proc/no-such-folder/out.json", "--out") is not None
    True
    """
    target = Path(path) if folder else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".probe-"):
            pass
    except OSError as err:
        return (f"cannot write {option} {path}: {err.strerror or err} ({err.filename or target}). "
                f"Fix: pass a {option} in a folder you can write to.")
    if not folder and Path(path).is_dir():
        return f"cannot write {option} {path}: it is a folder. Fix: pass a file name."
    return None
