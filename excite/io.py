"""Safe file I/O: atomic writes (a reader sees the old file or the new one, never half of either), torch
files read without running code, checksums that tell a damaged file, and a lock that keeps a second process out.

Everything excite writes (checkpoints, weights, metrics, plots, configs) goes through :func:`atomic_write`:
the data goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the
target with :func:`os.replace` (atomic on POSIX and Windows when both are on one file system), and the
directory is fsynced so the rename itself survives a power cut. The rename replaces a symbolic link at the
target itself, never the file it points to.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import stat
import uuid
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from excite.errors import CheckpointError, WriteRefused, first_line

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


_TMP_SUFFIX = ".tmp"
# The names atomic_write gives its temporary files: ".<target>.<8 hex digits>.tmp".
_TMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the ``with`` block ends.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text). If the block raises, the temporary file is
    removed and ``path`` keeps its old content (or stays absent). The parent directory must exist. A write
    the system refuses (a full disk, a read-only folder), whether it is raised as an ``OSError`` or as
    another error caused by one (``torch.save`` turns a failed write into a ``RuntimeError``), raises
    :class:`~excite.errors.WriteRefused` naming ``path``, chained from the original error.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    # A unique hidden name beside the target: same file system (so os.replace is atomic), and two
    # writers of the same path never share a temporary file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        # 0o666 lets the user's umask decide the permissions, as for any file opened with open();
        # O_BINARY (Windows only) stops the C runtime from translating newlines under Python's file object.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _refused(path, e) from e
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = _os_error_behind(e)
        if cause is None:
            raise
        raise _refused(path, cause) from e
    _fsync_dir(path.parent)


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that ``error`` is or was caused by (torch.save raises a RuntimeError while handling the
    file's OSError); None for any other error, and for a refusal already reported as WriteRefused."""
    seen = 0
    while error is not None and seen < 10:  # a bound, in case a chain loops
        if isinstance(error, WriteRefused):
            return None
        if isinstance(error, OSError):
            return error
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit, GeneratorExit
            return None
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _refused(path: Path, error: OSError) -> WriteRefused:
    text = str(error).strip()
    reason = error.strerror or (text.splitlines()[0] if text else type(error).__name__)
    return WriteRefused(path, reason, error.errno, existed=path.exists())


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

    Their targets are whole (the old or the new version), so the leftovers are only wasted space. Only names
    of the form :func:`atomic_write` gives them (``.<name>.<8 hex digits>.tmp``) are deleted: the directory
    may be the user's own, with ``*.tmp`` files of theirs.
    """
    directory = Path(directory)
    if directory.is_dir():
        for leftover in directory.glob(f".*{_TMP_SUFFIX}"):
            if _TMP_NAME.fullmatch(leftover.name) and not leftover.is_dir():
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
    """Hold an exclusive lock on ``path`` (created if missing, removed on release) for the ``with`` block.

    Anyone asking while it is held gets :class:`LockHeld` at once, with the holder's process id, which the
    holder keeps in the file. The lock (``flock``) belongs to the open file, so the OS releases it when the
    holder ends, however it ends: a killed process never leaves a stale lock (processes forked from the
    holder, such as data loader workers, close their inherited copy); it leaves only the file, which the next
    holder takes over. It is advisory: it keeps out only those who ask for it. Where there is no ``fcntl``
    (Windows), or the file system cannot lock (some network file systems), nothing is locked; the latter with
    a warning. A ``path`` that is a symbolic link, or anything but a plain file of its own (a hard link to
    another file, a pipe, a device), raises :class:`~excite.errors.CheckpointError` and is left untouched: the
    directory may come from someone else, and writing the lock through a link would empty the file it names.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    fd, locked = _open_and_lock(path)
    try:
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
            # Removed while still held, so no file is left behind; whoever opened it meanwhile finds, once they
            # hold their lock, that the path no longer names their file, and opens the path anew.
            with suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    os.unlink(path)
    finally:
        os.close(fd)  # releases the lock


def _open_and_lock(path: Path) -> tuple[int, bool]:
    """Open the lock file ``path`` and flock it; returns the descriptor and whether it is locked."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).strip()
            os.close(fd)
            raise LockHeld(path, int(holder) if holder.isdigit() else None) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warnings.warn(f"{path.parent} cannot be locked ({e.strerror}): nothing stops a second process from "
                          "training in it at the same time", stacklevel=4)
            return fd, False
        # The holder before us removes the file before it lets go: if we opened it before the removal, we
        # hold the lock of a file nobody else will ever open, and must lock the one the path names now.
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd, True
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    # O_NOFOLLOW: a symbolic link is refused, not followed; O_NONBLOCK: a pipe does not hang the open.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) or path.is_symlink():  # ELOOP on Linux, EMLINK on FreeBSD
            raise CheckpointError(_not_a_lock_file(path, "a symbolic link")) from None
        if e.errno == errno.EISDIR:
            raise CheckpointError(_not_a_lock_file(path, "a directory")) from None
        raise
    info = os.fstat(fd)
    problem = ("not a plain file" if not stat.S_ISREG(info.st_mode)
               else f"a hard link to a file with {info.st_nlink - 1} other name(s)" if info.st_nlink > 1 else None)
    if problem is not None:
        os.close(fd)
        raise CheckpointError(_not_a_lock_file(path, problem))
    return fd


def _not_a_lock_file(path: Path, what: str) -> str:
    return (f"{path} is {what}, not the lock file excite creates, so excite will not write to it; check what it "
            "points to, remove it, and run again")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically as UTF-8 (newlines are written as given)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` atomically as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


CHECKSUM = "checksum"  # the key of the checksum in a checkpoint, and in a weights file's metadata


def checksum(obj: Any) -> str:
    """``"sha256:<hex digits>"`` of ``obj``: every tensor in it (its name, dtype, shape and bytes) and every plain
    value, through nested dicts, lists and tuples in sorted key order.

    The same for a structure and for its copy read back from a file (on any device), and different once any
    byte of its tensors or any value changes. It tells damage, not tampering: whoever can change a file can
    store a new checksum in it.
    """
    # sha256 rather than crc32: on a 100 MiB state dict it takes 76 ms against 29 ms (2-core CPU with SHA
    # instructions), less than a fifth of what torch.save and fsync take for the same bytes (407 ms), and no
    # damage can go unnoticed by chance.
    digest = hashlib.sha256()
    _feed(digest, obj, "")
    return f"sha256:{digest.hexdigest()}"


def _feed(digest: Any, obj: Any, name: str) -> None:
    if isinstance(obj, torch.Tensor):
        digest.update(f"{name}\0{obj.dtype}\0{tuple(obj.shape)}\0".encode())
        # The bytes as they are, in their logical order; uint8 first, as numpy has no bfloat16.
        digest.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        for key, value in sorted(obj.items(), key=lambda item: repr(item[0])):
            _feed(digest, value, f"{name}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _feed(digest, value, f"{name}/{i}")
    else:
        digest.update(f"{name}\0{obj!r}\0".encode())


def verify_checksum(obj: Any, stored: Any, path: str | os.PathLike) -> None:
    """Raise a one-line CheckpointError naming ``path`` unless ``stored`` is :func:`checksum` of ``obj``."""
    if stored != checksum(obj):
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum stored when it was "
                              "written; use the run's other checkpoint or retrain")


def safetensors_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The :func:`checksum` excite stores under ``CHECKSUM`` in a ``.safetensors`` file's metadata: of its tensors
    and of its other metadata entries as stored (JSON strings)."""
    return checksum(_safetensors_contents(tensors, metadata))


def verify_safetensors_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                                path: str | os.PathLike) -> None:
    """Raise a one-line CheckpointError naming ``path`` when a ``.safetensors`` file's metadata holds a checksum
    that its contents do not match; a file without one (another tool's, an older excite's) passes."""
    if CHECKSUM in metadata:
        try:
            stored = json.loads(metadata[CHECKSUM])
        except json.JSONDecodeError:
            stored = None  # damaged too
        verify_checksum(_safetensors_contents(tensors, metadata), stored, path)


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``.safetensors`` file, its checksum verified when it has one (see
    :func:`verify_safetensors_checksum`): the one reader of every ``.safetensors`` file excite loads. A missing,
    truncated or foreign file is one :class:`CheckpointError` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({first_line(e)}): it is not a valid safetensors file "
                              "(cut short, or another format)") from None
    verify_safetensors_checksum(tensors, metadata, path)
    return tensors, metadata


def _safetensors_contents(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    return {"tensors": tensors, "metadata": {k: v for k, v in metadata.items() if k != CHECKSUM}}


def _trusted_globals():
    """The classes, beyond tensors and containers, that ``weights_only`` loading may rebuild: exactly
    ``argparse.Namespace``, which timm's training script stores its arguments in (``model_best.pth.tar``).
    Rebuilding one runs no code from the file; a subclass of it is a different class and still refused."""
    return torch.serialization.safe_globals([argparse.Namespace])


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
            with _trusted_globals():
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
        raise CheckpointError(f"cannot load {path} ({reason}): the file is truncated or corrupt (damaged in a copy "
                              "or on disk); copy it again or use the run's other checkpoint") from None


def _not_torch(path: Path) -> str:
    return f"{path} is not a PyTorch file, or it is corrupt: pass a file written by torch.save or a .safetensors file"
