"""A run directory's life outside the epochs: its lock, and the files that say what ran.

While it trains, a run holds an exclusive lock on ``.lock`` in its directory, so a second ``excite train`` into
the same directory (a resume, or a new run) is refused instead of interleaving its checkpoints and metrics
with the first's. The OS drops the lock when the process ends, however it ends, so it never goes stale.

Besides the checkpoints and metrics (:mod:`excite.train.run`), a run directory holds ``config.json`` (the
resolved options, and what the user asked for where it differs), ``model.json`` (the model's size),
``environment.json`` (one entry per session: device, versions, command) and ``skipped_files.txt`` (images left
out as unreadable). Under several processes only process 0 holds the lock and writes; the others read what it
shares with them (:meth:`RunDirectory.open`).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from excite.data import format_skipped_lines, parse_skipped_lines
from excite.environment import describe
from excite.errors import CheckpointError, ExciteError
from excite.io import LockHeld, atomic_write_json, atomic_write_text, exclusive_lock, remove_leftover_temporaries
from excite.train.checkpoint import LAST, load_checkpoint
from excite.train.config import REQUESTED_KEY, TrainConfig
from excite.train.distributed import Processes, ReportedByMainProcess

# Held locked by the process that trains the run.
LOCK_FILE = ".lock"
# The model's parameters, MACs and memory estimate (excite.models.summary), one image.
MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
SESSIONS_FILE = "environment.json"
SKIPPED_FILE = "skipped_files.txt"
# Options that may change when a run is resumed; everything else must stay as the run started.
# The data may have moved (a relative path given from another folder, a copied data set): the split recorded in
# the checkpoint keeps the run on the same images.
RESUMABLE_OVERRIDES = ("epochs", "workers", "device", "checkpoint_minutes", "progress_seconds", "save", "data",
                       "data_root", "logger")


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: str | Path, **overrides) -> TrainConfig:
    """The config a run was started with, with the options in RESUMABLE_OVERRIDES replaced when given."""
    if not (Path(run_dir) / LAST).is_file():
        raise CheckpointError(f"{run_dir} has no last.pt to resume from: give the directory of a run that finished "
                              "at least one epoch, or start a new run")
    checkpoint = load_checkpoint(Path(run_dir) / LAST)
    values = dict(checkpoint["config"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in RESUMABLE_OVERRIDES:
            if values.get(key) != value:
                raise ExciteError(f"--{key.replace('_', '-')} cannot change when resuming; start a new run instead")
            continue
        values[key] = value
    values["out"] = str(run_dir)
    return TrainConfig.from_dict(values, f"{run_dir}/{LAST}").validate()


def read_json(path: Path, kind: type) -> Any:
    """The JSON value in ``path`` if it can be read and is a ``kind``; None for a missing or damaged file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, kind) else None


class RunDirectory:
    """The directory of one run, as one process of it sees it: only the ``writer`` (process 0) locks and writes."""

    def __init__(self, path: Path, *, resume: bool, writer: bool, held: ExitStack) -> None:
        self.path, self.resume, self.writer, self._held = path, resume, writer, held
        self.locked = False

    @classmethod
    def open(cls, config: TrainConfig, resume: bool, place: Processes, held: ExitStack
             ) -> tuple["RunDirectory", TrainConfig, dict | None]:
        """The run's directory (locked until ``held`` closes, if it exists), its config with the directory and run
        id filled in, and on a resume its last checkpoint. Process 0 decides; the others get its answer."""
        answer, failure = None, None
        if place.is_main:
            try:
                answer = cls._open_main(config, resume, held)
            except ExciteError as error:
                failure = error
        shared = place.share(("failed", str(failure)) if failure else ("ok", answer and answer[:2]))
        if failure is not None:
            raise failure
        if shared[0] == "failed":
            raise ReportedByMainProcess(shared[1])
        config, checkpoint = shared[1]
        directory = cls(Path(config.out), resume=resume, writer=place.is_main, held=held)
        directory.locked = answer is not None and answer[2]
        return directory, config, checkpoint

    @classmethod
    def _open_main(cls, config: TrainConfig, resume: bool, held: ExitStack
                   ) -> tuple[TrainConfig, dict | None, bool]:
        path = Path(config.out) if config.out else default_run_dir(config.model)
        config = dataclasses.replace(config, out=str(path))
        # An existing directory is locked before it is read or cleaned, as another process may be writing it; a new
        # one once it is created (see create()).
        locked = path.is_dir()
        if locked:
            cls(path, resume=resume, writer=True, held=held)._lock()
        checkpoint = load_checkpoint(path / LAST) if resume else None
        if checkpoint is not None:
            _check_same_run(path, checkpoint)
        else:  # a new run gets a new id, even when its options come from another run's config.json
            config = dataclasses.replace(config, run_id=uuid.uuid4().hex[:12])
        remove_leftover_temporaries(path)
        return config, checkpoint, locked

    def _lock(self) -> None:
        """Lock the directory until ``held`` closes; a new run also refuses a directory that already holds a run."""
        try:
            self._held.enter_context(exclusive_lock(self.path / LOCK_FILE))
        except LockHeld as e:
            pid = f" (pid {e.pid})" if e.pid else ""
            raise ExciteError(f"{self.path} is in use by another excite process{pid}; wait for it to finish or train "
                              "into another --out") from None
        self.locked = True
        if not self.resume and (self.path / LAST).exists():
            raise ExciteError(f"{self.path} already holds a run; continue it with --resume {self.path} or choose "
                              "another --out")

    def create(self) -> None:
        """Make the directory and lock it, once the run is about to train (nothing is left behind by a run that
        fails before). Another run may have created the directory meanwhile, and even finished in it."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.locked:
            self._lock()

    def begin_session(self, config: TrainConfig, requested: TrainConfig, size: dict, device: torch.device,
                      place: Processes) -> None:
        """Create and lock the directory if need be, and write what says what this session runs: config.json,
        model.json and its entry in environment.json."""
        self.create()
        self.write_config(config, requested)
        self.write_model(size)
        self.add_session(device, place)

    def write_config(self, config: TrainConfig, requested: TrainConfig) -> None:
        """config.json: the resolved options, and under "requested" the values the user gave where they differ
        (kept from the first session on a resume, whose config is already resolved)."""
        if not self.writer:
            return
        path = self.path / CONFIG_FILE
        asked = {key: value for key, value in requested.to_dict().items()
                 if key != "run_id" and value != getattr(config, key)}
        earlier = read_json(path, dict) if self.resume else None  # None: no config.json, or a damaged one
        if earlier is not None:
            asked = earlier.get(REQUESTED_KEY) or asked
        atomic_write_json(path, {**config.to_dict(), REQUESTED_KEY: asked})

    def write_model(self, size: dict) -> None:
        """model.json: parameters and MACs of one image, so runs can be compared without building their models."""
        if self.writer:
            atomic_write_json(self.path / MODEL_FILE, size)

    def add_session(self, device: torch.device, place: Processes) -> None:
        """One entry per session of the run (the first, then each resume) in environment.json: what produced
        these results. A missing or damaged file is started again (with a warning)."""
        if not self.writer:
            return
        path = self.path / SESSIONS_FILE
        sessions = []
        if self.resume and path.exists():
            sessions = read_json(path, list)
            if sessions is None:
                warnings.warn(f"{path} is damaged; it is written again with this session only", stacklevel=3)
                sessions = []
        entry = describe(device)
        if place.distributed:
            entry["processes"] = place.world_size
        atomic_write_json(path, sessions + [entry])

    def read_skipped(self) -> dict[str, str]:
        """The entries of ``skipped_files.txt`` (path -> reason); empty if there is none, or (with a warning) if it
        cannot be read back: a bookkeeping file must not stop a resume."""
        path = self.path / SKIPPED_FILE
        if not path.is_file():
            return {}
        try:
            return parse_skipped_lines(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            warnings.warn(f"{path} cannot be read back ({e}); it is written again from this session's list",
                          stacklevel=2)
            return {}

    def write_skipped(self, scanned: list[tuple[str, str]], before: dict[str, str], since_scan: dict[str, str]
                      ) -> None:
        """Write ``skipped_files.txt``: this session's scan, then the files only earlier sessions recorded, then
        the images that became unreadable during this session."""
        if not self.writer:
            return
        now = {path for path, _ in scanned} | since_scan.keys()
        atomic_write_text(self.path / SKIPPED_FILE, format_skipped_lines(
            [*scanned, *((path, reason) for path, reason in before.items() if path not in now),
             *((path, f"{reason} (unreadable since the scan)") for path, reason in since_scan.items())]))


def _check_same_run(run_dir: Path, checkpoint: dict) -> None:
    """Refuse a last.pt that belongs to another run than the directory's config.json (a copied file)."""
    directory = read_json(run_dir / CONFIG_FILE, dict)
    if directory is None:  # no or a damaged config.json: last.pt alone says what the run is
        return
    directory_id = directory.get("run_id")
    checkpoint_id = checkpoint["config"].get("run_id")
    if directory_id and checkpoint_id and directory_id != checkpoint_id:
        raise CheckpointError(f"{run_dir / LAST} belongs to run {checkpoint_id} ({checkpoint['model_name']}), "
                              f"but {run_dir} holds run {directory_id}: it was copied from another run directory. "
                              "Put that file back in its own run directory and resume there")
