"""Safe file I/O: atomic writes (a reader sees the old file or the new one, never half of either), torch
files read without running code, and a lock that keeps a second process out.

Everything excite writes (checkpoints, weights, metrics, plots, configs) goes through :func:`atomic_write`:
the data goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the
target with :func:`os.replace` (atomic on POSIX and Windows when both are on one file system), and the
directory is fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from excite.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


_TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the ``with`` block ends.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text). If the block raises, the temporary file is
    removed and ``path`` keeps its old content (or stays absent). The parent directory must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    # A unique hidden name beside the target: same file system (so os.replace is atomic), and two
    # writers of the same path never share a temporary file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    # 0o666 lets the user's umask decide the permissions, as for any file opened with open();
    # O_BINARY (Windows only) stops the C runtime from translating newlines under Python's file object.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Only POSIX can open a directory to fsync it; Windows makes the rename durable by itself.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftover_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporary files that writes killed mid-way (``kill -9``, power cut) left in ``directory``.

    Their targets are whole (the old or the new version), so the leftovers are only wasted space.
    """
    directory = Path(directory)
    if directory.is_dir():
        for leftover in directory.glob(f".*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


# Descriptors of the locks this process holds. A forked child (a DataLoader worker) inherits them, and an
# flock lasts while any descriptor of the open file does, so the child closes its copies at once.
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class LockHeld(Exception):
    """Another open file holds the lock asked for; ``pid`` is its process, None when unknown."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by process {pid}")
        self.path, self.pid = path, pid


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Anyone asking while it is held gets :class:`LockHeld` at once, with the holder's process id, which the
    holder keeps in the file. The lock (``flock``) belongs to the open file, so the OS releases it when the
    holder ends, however it ends: a killed process never leaves a stale lock (processes forked from the
    holder, such as data loader workers, close their inherited copy). It is advisory: it keeps out only
    those who ask for it. Where there is no ``fcntl`` (Windows), or the file system cannot lock
    (some network file systems), nothing is locked; the latter with a warning.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).strip()
            raise LockHeld(path, int(holder) if holder.isdigit() else None) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{path.parent} cannot be locked ({e.strerror}): nothing stops a second process from "
                          "training in it at the same time", stacklevel=3)
            locked = False
        if not locked:
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_lock_fds.add(fd)
        try:
            yield
        finally:
            _held_lock_fds.discard(fd)
            # Emptied before release, so the file names a process only while that process holds the lock
            # (or was killed holding it).
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically as UTF-8 (newlines are written as given)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` atomically as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only, so nothing
    stored in the file can run. A missing, corrupt or code-carrying file raises a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a run directory, its last.pt or best.pt, or a weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty: the copy or download did not finish; get the file again")
    try:
        with warnings.catch_warnings():
            # A plain pickle (not torch.save's zip) makes torch warn about its protocol before refusing it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # how torch reports anything weights_only refuses, and non-torch files
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise CheckpointError(_not_torch(path)) from None
        raise CheckpointError(f"refusing to load {path}: it contains pickled code ({found.group(1)}), which could run "
                              "on your machine; only load files you trust, or re-save the weights as "
                              ".safetensors") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # what torch.save has written since PyTorch 1.6
        if not is_zip:
            raise CheckpointError(_not_torch(path)) from None
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path} ({reason}): the file is truncated or corrupt; copy it again or "
                              "use the run's other checkpoint") from None


def _not_torch(path: Path) -> str:
    return f"{path} is not a PyTorch file, or it is corrupt: pass a file written by torch.save or a .safetensors file"
