"""``fit``: one training run from a config to a run directory.

A run directory holds ``config.json``, ``metrics.csv`` / ``metrics.jsonl``, ``curves.png``,
``last.pt`` (every epoch, every ``checkpoint_minutes`` inside an epoch, and on Ctrl-C) and ``best.pt``
+ ``best.safetensors`` (best validation accuracy), and ``skipped_files.txt`` when unreadable images
were left out (by the scan of any session of the run, or because they broke during one). Checkpoints
are written atomically, so a run killed at any moment resumes from its last checkpoint with
``excite train --resume DIR``.

While it trains, a run holds an exclusive lock on ``.lock`` in its directory, so a second ``excite train`` into
the same directory (a resume, or a new run) is refused instead of interleaving its checkpoints and metrics
with the first's. The OS drops the lock when the process ends, however it ends, so it never goes stale.

Randomness is a pure function of (seed, epoch): every epoch reseeds all generators and the data
order, and a mid-epoch checkpoint keeps the generators' state and the step, so a resumed run repeats
exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import signal
import sys
import threading
import time
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from excite.data import DataBundle, batch_mixer, build_data, format_skipped_lines, make_loader, parse_skipped_lines
from excite.data.gpu_cache import cached_loaders
from excite.data.loader import default_workers
from excite.data.transforms import describe_transform
from excite.environment import describe, select_device
from excite.errors import CheckpointError, ExciteError, NonFiniteLossError, RunInterrupted, UnknownModelError
from excite.io import LockHeld, atomic_write_json, atomic_write_text, exclusive_lock, remove_leftover_temporaries
from excite.models import create_model, summary
from excite.models.pretrained import resolve_pretrained
from excite.models.weights import load_weights
from excite.report.loggers import LoggerGroup, build_loggers
from excite.report.metrics import MetricsLogger, classification_report, format_epoch_line
from excite.report.plots import plot_curves
from excite.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_state,
    resume_hint_on_refused_writes,
    save_checkpoint,
    save_weights,
)
from excite.train.config import REQUESTED_KEY, TrainConfig
from excite.train.finetune import apply_freeze, follow_weights
from excite.train.loop import EpochProgress, EpochStats, Precision, ProgressDisplay, evaluate, train_one_epoch
from excite.train.optim import build_optimizer, build_scheduler, lr_factor

# The largest uint8 image set (in bytes) that --cache-images is on for by default: CIFAR-10 at 32 px takes
# 150 MiB; a limit 13x that still fits beside training in a laptop's or a small GPU's memory.
IMAGE_CACHE_LIMIT = 2 * 2**30
# Options that may change when a run is resumed; everything else must stay as the run started.
# The data may have moved (a relative path given from another folder, a copied data set): the split recorded in
# the checkpoint keeps the run on the same images.
RESUMABLE_OVERRIDES = ("epochs", "workers", "device", "checkpoint_minutes", "progress_seconds", "save", "data",
                       "data_root", "logger")
#: The built-in sources, which are names rather than paths.
NAMED_SOURCES = ("digits", "cifar10", "cifar100")
# In the run directory: held locked by the process that trains the run.
LOCK_FILE = ".lock"
# In the run directory: the model's parameters, MACs and memory estimate (excite.models.summary), one image.
MODEL_FILE = "model.json"
# In the run directory: the best epoch's validation confusion matrix (rows: true class) and per-class scores.
BEST_VAL_FILE = "best_val.json"


@dataclass
class RunResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    history: list[dict]


class StopRequest:
    """Within ``with``, the first Ctrl-C (SIGINT) or SIGTERM (what job schedulers and ``kill`` send before they
    kill) only sets :attr:`requested`, so training can stop after the current step with a checkpoint; a second
    one interrupts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "Ctrl-C"  # what asked to stop, for the message
        self.exit_code = 130  # what shells report for a process stopped by that signal: 128 + its number
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGTERM:
            self.signal_name, self.exit_code = "SIGTERM", 128 + signal.SIGTERM

    def interrupted(self, where: str) -> RunInterrupted:
        """The error that ends a run stopped ``where`` (e.g. "after epoch 3; saved in ...")."""
        error = RunInterrupted(f"stopped by {self.signal_name} {where}")
        error.exit_code = self.exit_code
        return error

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for name in self.SIGNALS:
                number = getattr(signal, name, None)  # Windows has no SIGTERM handler to speak of
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible streams per epoch; 1_000_003 is prime so (seed, epoch) pairs do not collide.
    return seed * 1_000_003 + epoch


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: str | Path, **overrides) -> TrainConfig:
    """The config a run was started with, with the options in RESUMABLE_OVERRIDES replaced when given."""
    if not (Path(run_dir) / "last.pt").is_file():
        raise CheckpointError(f"{run_dir} has no last.pt to resume from: give the directory of a run that finished "
                              "at least one epoch, or start a new run")
    checkpoint = load_checkpoint(Path(run_dir) / "last.pt")
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
    return TrainConfig.from_dict(values, f"{run_dir}/last.pt").validate()


def _lock_run_dir(held: ExitStack, run_dir: Path, resume: bool) -> None:
    """Lock ``run_dir`` until ``held`` closes; a new run also refuses a directory that already holds a run."""
    try:
        held.enter_context(exclusive_lock(run_dir / LOCK_FILE))
    except LockHeld as e:
        pid = f" (pid {e.pid})" if e.pid else ""
        raise ExciteError(f"{run_dir} is in use by another excite process{pid}; wait for it to finish or train "
                          "into another --out") from None
    if not resume and (run_dir / "last.pt").exists():
        raise ExciteError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")


def _resolved(config: TrainConfig, data: DataBundle, use_cache: bool) -> TrainConfig:
    """``config`` with what "auto" and None resolved to for this data (size, preset, image cache) and the data
    paths made absolute, so that config.json says what ran and a resume from another folder finds the data."""
    def absolute(path: str | None) -> str | None:
        return path if path is None or path in NAMED_SOURCES else str(Path(path).expanduser().resolve())
    return dataclasses.replace(config, img_size=data.img_size, preset=data.preset, cache_images=use_cache,
                               batch_size=data.batch_size,  # cut to the training set's size when larger
                               data=absolute(config.data), data_root=absolute(config.data_root),
                               val_dir=absolute(config.val_dir))


def _read_json(path: Path, kind: type) -> Any:
    """The JSON value in ``path`` if it can be read and is a ``kind``; None for a missing or damaged file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, kind) else None


def _write_config(path: Path, config: TrainConfig, requested: TrainConfig, resume: bool) -> None:
    """config.json: the resolved options, and under "requested" the values the user gave where they differ
    (kept from the first session on a resume, whose config is already resolved)."""
    asked = {key: value for key, value in requested.to_dict().items()
             if key != "run_id" and value != getattr(config, key)}
    earlier = _read_json(path, dict) if resume else None  # None: no config.json, or a damaged one (rewritten)
    if earlier is not None:
        asked = earlier.get(REQUESTED_KEY) or asked
    atomic_write_json(path, {**config.to_dict(), REQUESTED_KEY: asked})


def _check_same_run(run_dir: Path, checkpoint: dict) -> None:
    """Refuse a last.pt that belongs to another run than the directory's config.json (a copied file)."""
    directory = _read_json(run_dir / "config.json", dict)
    if directory is None:  # no or a damaged config.json: last.pt alone says what the run is
        return
    directory_id = directory.get("run_id")
    checkpoint_id = checkpoint["config"].get("run_id")
    if directory_id and checkpoint_id and directory_id != checkpoint_id:
        raise CheckpointError(f"{run_dir / 'last.pt'} belongs to run {checkpoint_id} ({checkpoint['model_name']}), "
                              f"but {run_dir} holds run {directory_id}: it was copied from another run directory. "
                              "Put that file back in its own run directory and resume there")


def _peak_memory_mib(model: torch.nn.Module) -> float:
    """The most memory the run has held so far: the GPU's allocations on CUDA, else the process's peak resident
    size (which counts everything the process holds, data included)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _read_sessions(path: Path) -> list:
    """The sessions recorded in environment.json; a missing or damaged file is started again (with a warning)."""
    if not path.exists():
        return []
    sessions = _read_json(path, list)
    if sessions is not None:
        return sessions
    warnings.warn(f"{path} is damaged; it is written again with this session only", stacklevel=3)
    return []


def _explain_schedule(checkpoint: dict, config: TrainConfig, start_epoch: int, steps_per_epoch: int,
                      log: Callable[[str], None]) -> None:
    """On a resume, say when there is nothing left to train, and what a changed --epochs does to the schedule."""
    before = TrainConfig.from_dict(checkpoint["config"])
    if start_epoch > config.epochs:
        log(f"The run has already trained its {config.epochs} epochs; give --epochs with a larger number to train "
            "on")
    elif before.epochs != config.epochs and config.sched in ("cosine", "onecycle"):
        step = (start_epoch - 1) * steps_per_epoch
        was = before.lr * lr_factor(step, steps_per_epoch, before)
        now = config.lr * lr_factor(step, steps_per_epoch, config)
        log(f"The {config.sched} schedule now spans {config.epochs} epochs instead of {before.epochs}: epoch "
            f"{start_epoch} trains at lr {now:.2E} (the {before.epochs}-epoch schedule was at {was:.2E})")


def _read_skipped(path: Path) -> dict[str, str]:
    """The entries of a ``skipped_files.txt`` (path -> reason); empty if there is none, or (with a warning) if
    it cannot be read back: a bookkeeping file must not stop a resume."""
    if not path.is_file():
        return {}
    try:
        return parse_skipped_lines(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        warnings.warn(f"{path} cannot be read back ({e}); it is written again from this session's list",
                      stacklevel=2)
        return {}


def _check_model_fits_data(model: torch.nn.Module, config: TrainConfig, img_size: int, batch_size: int,
                           device: torch.device) -> None:
    """Fail before training, with advice, when the model cannot train on these images at this batch size."""
    in_chans = config.model_kwargs.get("in_chans", 3)
    if in_chans != 3:
        raise ExciteError(f"excite reads every image as RGB (3 channels), so a model built with --model-arg "
                          f"in_chans={in_chans} cannot train on them; drop that --model-arg")
    if batch_size == 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ExciteError(f"{config.model} has BatchNorm layers, which cannot train on batches of one image (their "
                          "statistics need two or more): use --batch-size 2 or more")
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except (torch.OutOfMemoryError, MemoryError):  # a smaller batch cannot help with one image
        raise ExciteError(
            f"out of memory running one {img_size}x{img_size} image through {config.model} on {device}; "
            "use a smaller --img-size or model"
        ) from None
    except RuntimeError as e:
        if "allocat" in str(e) or "out of memory" in str(e):  # the CPU allocator's words for the same thing
            raise ExciteError(
                f"out of memory running one {img_size}x{img_size} image through {config.model} on {device} "
                f"({str(e).splitlines()[0]}); use a smaller --img-size or model") from None
        raise ExciteError(
            f"model {config.model} cannot take {img_size}x{img_size} images ({str(e).splitlines()[0]}); "
            "use a larger --img-size, or a *_cifar / densenet_bc_* model for small images"
        ) from None


def _use_image_cache(config: TrainConfig, data, device: torch.device) -> bool:
    """Whether batches come from the on-device image cache instead of a DataLoader."""
    if config.cache_images and config.augment:
        raise ExciteError(f"--augment {config.augment} works per image and cannot run on the image cache: drop one "
                          "of --augment and --cache-images")
    if config.cache_images is not None:
        return config.cache_images
    # For small images the per-image pipeline costs about as much as the model (on 2 CPU cores ResNet-20
    # trains on CIFAR-10 at 525 img/s from JPEG files, 753 img/s from the cache: bench/run_cache_cpu.sh);
    # sets this small fit in memory on any device.
    size = (len(data.train) + len(data.val)) * 3 * data.img_size ** 2
    return data.preset == "cifar" and config.augment is None and size <= IMAGE_CACHE_LIMIT


@dataclass
class _Run:
    """A run in progress: what its checkpoints hold (the model, optimizer and scheduler, the metrics history, the
    best epoch), what it has told the user (where last.pt stands, which images it skipped), and what happens
    after each training step and each epoch. :func:`fit` sets everything up, then drives a ``_Run`` through
    the epochs."""

    config: TrainConfig
    run_dir: Path
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    log: Callable[[str], None]
    steps_per_epoch: int
    history: list[dict] = field(default_factory=list)  # one metrics row per epoch, earlier sessions' included
    best_acc: float = -1.0
    best_epoch: int = 0
    saved_at: str | None = None  # what last.pt holds, for messages: "epoch 3", or "epoch 4, step 120" mid-epoch
    last_save: float = field(default_factory=time.monotonic)  # when last.pt was written, or the session began
    skipped_before: dict[str, str] = field(default_factory=dict)  # earlier sessions' skipped files: path -> reason
    skipped_in_run: dict[str, str] = field(default_factory=dict)  # images unreadable since the scan: path -> reason
    metrics: MetricsLogger | None = None  # opened once the run directory is locked
    loggers: LoggerGroup | None = None  # the metrics files, then the other loggers
    stop: StopRequest = field(default_factory=StopRequest)

    def restore(self, checkpoint: dict) -> tuple[int, dict | None]:
        """Load the state of ``checkpoint``; returns the epoch to start at and, if it was saved inside that
        epoch, where (its ``partial``)."""
        path = self.run_dir / "last.pt"
        restore_state(self.model, checkpoint["model"], "model", path)
        restore_state(self.optimizer, checkpoint["optimizer"], "optimizer", path)
        restore_state(self.scheduler, checkpoint["scheduler"], "scheduler", path)
        if self.scaler is not None and checkpoint.get("scaler"):
            restore_state(self.scaler, checkpoint["scaler"], "AMP scaler", path)
        self.history = list(checkpoint["metrics"])
        self.best_acc, self.best_epoch = checkpoint["best_acc"], checkpoint["best_epoch"]
        start_epoch, partial = checkpoint["epoch"] + 1, checkpoint.get("partial")
        self.saved_at = (f"epoch {start_epoch}, step {partial['progress']['step']}" if partial
                         else f"epoch {start_epoch - 1}")
        return start_epoch, partial

    def checkpoint_state(self, epoch: int, partial: dict | None = None) -> dict:
        """What a checkpoint after ``epoch`` holds (the layout in :mod:`excite.train.checkpoint`)."""
        return {
            "model_name": self.config.model, "model_kwargs": dict(self.model.model_kwargs),
            "classes": list(self.data.classes), "config": self.config.to_dict(), "img_size": self.data.img_size,
            "preset": self.data.preset, "epoch": epoch, "model": self.model.state_dict(),
            "split": self.data.split,  # which images train and which validate, by key (see build_data)
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "metrics": self.history, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            # A mid-epoch checkpoint also says where in epoch+1 it stopped, and the random state there.
            "partial": partial,
        }

    def write_skipped(self) -> None:
        """Write ``skipped_files.txt``: this session's scan, then the files only earlier sessions recorded, then
        the images that became unreadable during this session."""
        scan = self.data.report
        now = {path for path, _ in scan.skipped} | self.skipped_in_run.keys()
        atomic_write_text(self.run_dir / "skipped_files.txt", format_skipped_lines(
            [*scan.skipped, *((path, reason) for path, reason in self.skipped_before.items() if path not in now),
             *((path, f"{reason} (unreadable since the scan)") for path, reason in self.skipped_in_run.items())]))

    def step_hook(self, on_step: Callable[[dict], None] | None, epoch: int) -> Callable[[dict], None] | None:
        """What train_one_epoch calls after each step: ``on_step`` and the loggers that want steps (None when
        nobody does, which spares reading the loss back every step)."""
        if on_step is None and not (self.loggers and self.loggers.wants_steps):
            return None

        def hook(values: dict) -> None:
            values = {**values, "global_step": (epoch - 1) * self.steps_per_epoch + values["step"]}
            if on_step is not None:
                on_step(values)
            if self.loggers is not None:
                self.loggers.log_step(values)
        return hook

    def finish_loggers(self, result: dict | None = None) -> None:
        """Tell the loggers the run ended (``result`` None: with an error), once."""
        if self.loggers is not None:
            loggers, self.loggers = self.loggers, None
            loggers.finish(result)

    def lr_at_step(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based over the run): a pure function of the step, so it
        is the same whether the epoch ran in one session or was resumed."""
        return self.config.lr * lr_factor(step, self.steps_per_epoch, self.config)

    def check_finite(self, when: str) -> None:
        """Refuse to go on (and so to checkpoint) once a weight or a BatchNorm statistic is NaN or infinite: a
        checkpoint is only ever written from a state training can continue from."""
        for kind, named in (("parameter", self.model.named_parameters()), ("buffer", self.model.named_buffers())):
            for name, tensor in named:
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise NonFiniteLossError(f"the model's {kind} {name} became NaN or infinite {when}, so it was "
                                             f"not saved. Lower --lr, add --warmup-epochs, or use a smaller "
                                             "--batch-size")

    def save_mid_epoch(self, epoch: int, progress: EpochProgress) -> bool:
        """After each training step: checkpoint every --checkpoint-minutes and when Ctrl-C asks to stop; True stops."""
        if self.stop.requested or time.monotonic() - self.last_save >= self.config.checkpoint_minutes * 60:
            self.check_finite(f"at epoch {epoch}, step {progress.step}")
            partial = {"epoch": epoch, "progress": progress.to_dict(), "rng": capture_rng_state()}
            save_checkpoint(self.run_dir / "last.pt", self.checkpoint_state(epoch - 1, partial))
            self.last_save, self.saved_at = time.monotonic(), f"epoch {epoch}, step {progress.step}"
        return self.stop.requested

    def end_epoch(self, epoch: int, train: EpochStats, val: EpochStats, skipped: dict[str, str]) -> None:
        """Log and write the metrics, curves and checkpoints of a validated epoch; ``skipped`` holds the images
        the loaders have skipped so far in this session."""
        if len(skipped) > len(self.skipped_in_run):
            self.log(f"{len(skipped) - len(self.skipped_in_run)} image(s) became unreadable during epoch {epoch} "
                     f"and were skipped; see {self.run_dir / 'skipped_files.txt'}")
            self.skipped_in_run = skipped
            self.write_skipped()
        if not math.isfinite(val.loss):
            raise NonFiniteLossError(f"the validation loss became {val.loss} at epoch {epoch}, so that epoch was not "
                                     "saved. Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16")
        self.check_finite(f"after epoch {epoch}")
        row = {
            "epoch": epoch, "train_acc": train.acc, "train_loss": train.loss, "val_acc": val.acc,
            "val_loss": val.loss, "val_top5": val.top5,
            # The rate of the epoch's first step, as the tutorials print it; with a per-step schedule (cosine,
            # one-cycle, warm-up) the rate moves during the epoch, and lr_last is that of its last step.
            "lr": self.lr_at_step((epoch - 1) * self.steps_per_epoch),
            "lr_last": self.lr_at_step(epoch * self.steps_per_epoch - 1),
            "epoch_seconds": train.seconds + val.seconds, "train_images_per_s": train.images_per_s,
            "skipped_in_run": len(self.skipped_in_run), "peak_memory_mib": _peak_memory_mib(self.model),
        }
        self.history.append(row)
        self.log(format_epoch_line(epoch, train.acc, train.loss, val.acc, val.loss, row["lr"],
                                   row["epoch_seconds"], train.images_per_s))
        self.loggers.log_epoch(row)
        is_best = val.acc > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = val.acc, epoch
        state = self.checkpoint_state(epoch)
        # The best epoch before last.pt: a run killed between the two redoes this epoch on resume and writes
        # both again, whereas the other order would resume past an epoch whose best weights were never written.
        if is_best:
            # The best epoch's validation results in full, for reports that compare runs.
            atomic_write_json(self.run_dir / BEST_VAL_FILE, {
                "epoch": epoch, "val_acc": val.acc, "val_loss": val.loss, "val_top5": val.top5,
                "classes": list(self.data.classes), "confusion": val.confusion.tolist(),
                **classification_report(val.confusion, self.data.classes)})
        if is_best and self.config.save in ("best", "all"):
            if self.config.save == "all":
                save_checkpoint(self.run_dir / "best.pt", state)
            save_weights(self.run_dir / "best.safetensors", state)
        save_checkpoint(self.run_dir / "last.pt", state)
        self.last_save, self.saved_at = time.monotonic(), f"epoch {epoch}"
        plot_curves(self.history, self.run_dir / "curves.png")


def fit(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
        show_progress: Optional[bool] = None, on_step: Optional[Callable[[dict], None]] = None,
        loggers: Sequence[Any] = ()) -> RunResult:
    """Train ``config.model`` on ``config.data`` and write the run directory; returns the best result.

    With ``resume=True`` the run continues in ``config.out`` from its ``last.pt`` (use
    :func:`resume_config` to get the config back). ``log`` receives every line the run prints.
    ``show_progress`` (default: when stderr is a terminal) shows a progress bar with running numbers;
    without one, ``log`` gets a progress line every ``config.progress_seconds``. ``on_step`` receives each
    training step's ``{"epoch", "step", "global_step", "lr", "loss"}``. ``loggers`` receive the run as
    dicts (see :mod:`excite.report.loggers`: objects with ``start`` / ``log_step`` / ``log_epoch`` / ``finish``,
    or functions that get each epoch's metrics row), after the run's own metrics files and ``config.logger``'s.
    """
    config.validate()
    extra_loggers = [*build_loggers(config.logger), *loggers]  # a missing TensorBoard fails before anything runs
    run_dir = Path(config.out) if config.out else default_run_dir(config.model)
    config = dataclasses.replace(config, out=str(run_dir))
    with ExitStack() as held:  # holds the run directory's lock until fit() returns
        # A write the system refuses (a full disk) names its file and, once last.pt exists, how to continue.
        held.enter_context(resume_hint_on_refused_writes(run_dir))
        # An existing directory is locked before it is read or cleaned, as another process may be writing it; a
        # new one once it is created, below.
        locked = run_dir.is_dir()
        if locked:
            _lock_run_dir(held, run_dir, resume)
        checkpoint = load_checkpoint(run_dir / "last.pt") if resume else None
        if checkpoint is not None:
            _check_same_run(run_dir, checkpoint)
        else:  # a new run gets a new id, even when its options come from another run's config.json
            config = dataclasses.replace(config, run_id=uuid.uuid4().hex[:12])
        remove_leftover_temporaries(run_dir)
        if show_progress is None:
            show_progress = sys.stderr.isatty()
        display = ProgressDisplay(bar=show_progress, every_seconds=config.progress_seconds, log=log)

        device = select_device(config.device)
        if device.type == "cuda":
            # Batches keep one shape (fixed image size; only an epoch's last batch may be smaller), so cuDNN's
            # per-shape choice of the fastest convolution kernels is made once or twice and pays for the whole run.
            torch.backends.cudnn.benchmark = True
        if config.amp == "fp16" and device.type != "cuda":
            raise ExciteError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")
        precision = Precision(device, config.amp, config.channels_last)

        seed_everything(config.seed)
        # --pretrained: the file (named weights from their library's cache), whose input pipeline the run follows.
        weights = resolve_pretrained(config.pretrained, config.model) if config.pretrained and not checkpoint else None
        requested, config = config, follow_weights(config, weights, log)
        data = build_data(
            config.data, img_size=config.img_size, batch_size=config.batch_size, val_split=config.val_split,
            val_dir=config.val_dir, data_root=config.data_root, preset=config.preset, hflip=config.hflip,
            augment=config.augment, seed=config.seed, strict=config.strict, data_layout=config.data_layout,
            max_pixels=config.max_pixels, mean=config.mean, std=config.std, crop_pct=config.crop_pct,
            # A resumed run keeps the images on the side of the split they were on, whatever the folder now holds.
            recorded_split=checkpoint.get("split") if checkpoint is not None else None,
        )
        if checkpoint is not None and list(checkpoint["classes"]) != list(data.classes):
            raise CheckpointError(f"the classes of {run_dir}/last.pt do not match the data's; resume with the same "
                                  "data")
        workers = config.workers if config.workers >= 0 else default_workers(device)
        use_cache = _use_image_cache(config, data, device)
        config = _resolved(config, data, use_cache)
        if use_cache:
            train_loader, val_loader = cached_loaders(data, data.batch_size, device=device, hflip=config.hflip,
                                                      channels_last=config.channels_last, seed=config.seed)
        else:
            train_loader = make_loader(data.train, data.batch_size, train=True, workers=workers, seed=config.seed)
            val_loader = make_loader(data.val, data.batch_size, train=False, workers=workers, seed=config.seed)

        try:
            model = create_model(config.model, num_classes=len(data.classes), **config.model_kwargs)
        except UnknownModelError as e:  # its message already lists the close matches
            raise ExciteError(str(e)) from None
        except (TypeError, ValueError) as e:  # a --model-arg the builder does not take, or a value it cannot use
            raise ExciteError(f"cannot build {config.model} with --model-arg values {config.model_kwargs} ({e}); "
                              "fix or drop those --model-arg options") from None
        if weights is not None:
            log(str(load_weights(model, weights.path, strict=False)))
        model.to(device)
        _check_model_fits_data(model, config, data.img_size, data.batch_size, device)
        # Parameters and MACs of one image, so runs can be compared without building their models again.
        size = {**summary(model, img_size=data.img_size, device=device).to_dict(), "model_kwargs": model.model_kwargs}
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, len(train_loader), config)
        scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        train_model = torch.compile(model) if config.compile else model

        run = _Run(config, run_dir, data, model, optimizer, scheduler, scaler, log, len(train_loader))
        start_epoch, partial = 1, None
        if checkpoint is not None:
            start_epoch, partial = run.restore(checkpoint)
            log(f"Resuming {run_dir} from {run.saved_at}, to epoch {config.epochs}")

        run_dir.mkdir(parents=True, exist_ok=True)
        if not locked:  # another run may have created the directory meanwhile, and even finished in it
            _lock_run_dir(held, run_dir, resume)
        _write_config(run_dir / "config.json", config, requested, resume)
        atomic_write_json(run_dir / MODEL_FILE, size)
        # One entry per session of the run (the first, then each resume): what produced these results.
        sessions_file = run_dir / "environment.json"
        sessions = _read_sessions(sessions_file) if resume else []
        atomic_write_json(sessions_file, sessions + [describe(device)])
        if data.report.images:
            log(f"Scanned {config.data}: {data.report.summary()}")
        for note in data.notes:
            log(note)
        if resume:  # keep listing what earlier sessions skipped, though this scan may no longer see it
            run.skipped_before = _read_skipped(run_dir / "skipped_files.txt")
        if data.report.skipped or run.skipped_before:
            run.write_skipped()
        if data.report.skipped:
            log(f"Skipped {len(data.report.skipped)} unreadable file(s); see {run_dir / 'skipped_files.txt'}")
        # The checkpoint's history is the source of truth: a damaged metrics.jsonl is rebuilt from it.
        run.metrics = MetricsLogger(run_dir, rows=run.history)
        run.loggers = LoggerGroup([run.metrics, *extra_loggers])
        held.callback(run.finish_loggers)  # flushed however fit() ends; finish() below reports a success first
        run.loggers.start(run_dir, config.to_dict(), start_epoch)
        log(f"Training {config.model} on {config.data}: {len(data.train)} train / {len(data.val)} val images, "
            f"{len(data.classes)} classes, {data.img_size}px, device {device}, run directory {run_dir}")
        preset_note = f" (--preset auto chose {data.preset})" if requested.preset == "auto" else ""
        pipeline = describe_transform(data.preset, data.img_size, hflip=config.hflip, augment=config.augment,
                                      mean=config.mean, std=config.std, crop_pct=config.crop_pct)
        source = f"batches made on {device} from the image cache" if use_cache else f"{workers or 'no'} loader workers"
        log(f"Input{preset_note}: {pipeline}; {source}")
        if checkpoint is not None:
            _explain_schedule(checkpoint, config, start_epoch, len(train_loader), log)

        mix = batch_mixer(len(data.classes), config.mixup, config.cutmix)
        epoch = start_epoch
        resume_hint = f"Continue with: excite train --resume {run_dir}"
        try:
            with run.stop:
                for epoch in range(start_epoch, config.epochs + 1):
                    seed_everything(epoch_seed(config.seed, epoch))
                    progress = EpochProgress()
                    if partial is not None:  # finish the epoch a mid-epoch checkpoint stopped in
                        progress = EpochProgress(**partial["progress"])
                        restore_rng_state(partial["rng"])
                        partial = None
                    if freeze_note := apply_freeze(model, epoch, config):  # --freeze: a function of the epoch
                        log(freeze_note)
                    train_loader.set_epoch(epoch)
                    if progress.step > len(train_loader):  # files went missing since the mid-epoch checkpoint
                        log(f"The training set has shrunk since {run_dir / 'last.pt'} was saved at step "
                            f"{progress.step} of epoch {epoch}: that epoch ends there")
                    train_loader.set_epoch(epoch, start_batch=progress.step)
                    train = train_one_epoch(train_model, train_loader, optimizer, scheduler, precision, epoch=epoch,
                                            label_smoothing=config.label_smoothing, scaler=scaler, mix=mix,
                                            display=display, progress=progress,
                                            on_step=run.step_hook(on_step, epoch),
                                            after_step=functools.partial(run.save_mid_epoch, epoch))
                    if train is None:
                        raise run.stop.interrupted(f"at epoch {epoch}, step {progress.step}; saved in "
                                                   f"{run_dir / 'last.pt'}. {resume_hint}")
                    val = evaluate(train_model, val_loader, precision, len(data.classes), tta=config.tta,
                                   show_progress=show_progress)
                    # The loaders' lists of skipped images only grow.
                    run.end_epoch(epoch, train, val, {**train_loader.skipped, **val_loader.skipped})
                    if run.stop.requested:  # Ctrl-C while validating: the epoch is complete and saved
                        raise run.stop.interrupted(f"after epoch {epoch}; saved in {run_dir / 'last.pt'}. "
                                                   f"{resume_hint}")
        except NonFiniteLossError as e:
            saved = (f"the last good checkpoint is {run_dir / 'last.pt'} ({run.saved_at})" if run.saved_at
                     else "no epoch had completed")
            raise NonFiniteLossError(f"{e}; {saved}") from None
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
            # Asked of the disk, not of the loop: Ctrl-C can land after last.pt is renamed into place but before
            # the loop moves on.
            if not (run_dir / "last.pt").exists():
                raise RunInterrupted(f"interrupted during epoch {epoch}, before the first checkpoint; nothing to "
                                     "resume, start the run again") from None
            raise RunInterrupted(f"interrupted during epoch {epoch}; {run_dir / 'last.pt'} holds the last checkpoint. "
                                 f"{resume_hint}") from None
        except torch.OutOfMemoryError:
            raise ExciteError(
                f"out of GPU memory at --batch-size {data.batch_size} with {config.model} at {data.img_size}px; "
                f"try --batch-size {max(2, data.batch_size // 2)}"
                + ("" if config.amp else " or --amp bf16")
            ) from None

        run.finish_loggers({"best_acc": run.best_acc, "best_epoch": run.best_epoch,
                            "final": run.history[-1] if run.history else None})
        log(f"Best validation accuracy {run.best_acc:.1%} at epoch {run.best_epoch}; files in {run_dir}")
        return RunResult(run_dir=run_dir, best_acc=run.best_acc, best_epoch=run.best_epoch, history=run.history)
