"""A run in progress: the state its checkpoints hold, and what happens after each training step and epoch.

After each epoch the run writes ``metrics.csv`` / ``metrics.jsonl``, ``curves.png``, ``last.pt`` and, for the best
validation accuracy so far, ``best_val.json`` and ``best.safetensors`` (``best.pt`` too with ``--save all``);
``last.pt`` is also written every ``checkpoint_minutes`` inside an epoch and when Ctrl-C asks to stop. Under
several processes they all keep the same state and agree on when to checkpoint; process 0 writes.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from excite.data import DataBundle
from excite.errors import NonFiniteLossError
from excite.io import atomic_write_json
from excite.report.loggers import LoggerGroup
from excite.report.metrics import MetricsLogger, classification_report, format_epoch_line
from excite.report.plots import plot_curves
from excite.train.checkpoint import LAST, capture_rng_state, restore_state, save_checkpoint, save_weights
from excite.train.config import TrainConfig
from excite.train.distributed import Processes
from excite.train.failures import StopRequest
from excite.train.loop import EpochProgress, EpochStats
from excite.train.optim import lr_factor
from excite.train.run_directory import RunDirectory

# The best epoch's validation confusion matrix (rows: true class) and per-class scores.
BEST_VAL_FILE = "best_val.json"


def peak_memory_mib(model: torch.nn.Module) -> float:
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


@dataclass
class Run:
    """A run in progress: what its checkpoints hold (the model, optimizer and scheduler, the metrics history, the
    best epoch), what it has told the user (where last.pt stands, which images it skipped), and what happens
    after each training step and each epoch. :func:`~excite.train.fit.fit` sets everything up, then drives a
    ``Run`` through the epochs."""

    config: TrainConfig
    directory: RunDirectory
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    log: Callable[[str], None]
    steps_per_epoch: int
    processes: Processes = field(default_factory=Processes)
    history: list[dict] = field(default_factory=list)  # one metrics row per epoch, earlier sessions' included
    best_acc: float = -1.0
    best_epoch: int = 0
    epoch: int = 1  # the epoch training is in, for messages
    saved_at: str | None = None  # what last.pt holds, for messages: "epoch 3", or "epoch 4, step 120" mid-epoch
    last_save: float = field(default_factory=time.monotonic)  # when last.pt was written, or the session began
    skipped_before: dict[str, str] = field(default_factory=dict)  # earlier sessions' skipped files: path -> reason
    skipped_in_run: dict[str, str] = field(default_factory=dict)  # images unreadable since the scan: path -> reason
    loggers: LoggerGroup = field(default_factory=lambda: LoggerGroup([]))
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def run_dir(self) -> Path:
        return self.directory.path

    def restore(self, checkpoint: dict) -> tuple[int, dict | None]:
        """Load the state of ``checkpoint``; returns the epoch to start at and, if it was saved inside that
        epoch, where (its ``partial``)."""
        path = self.run_dir / LAST
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

    def resumed_progress(self, partial: dict) -> EpochProgress:
        """Where the epoch a mid-epoch checkpoint stopped in stands. The checkpoint holds the counts of all
        processes together: process 0 continues from them and the others from zero, so their sum stays right."""
        progress = EpochProgress(**partial["progress"])
        if not self.processes.is_main:
            progress.seen, progress.loss_sum, progress.correct = 0, 0.0, 0
        return progress

    def begin(self, start_epoch: int, extra_loggers: list) -> None:
        """Open the metrics files (process 0; the checkpoint's history is their source of truth, so a damaged
        metrics.jsonl is rebuilt from it) and the other loggers, and list the images earlier sessions skipped."""
        if self.directory.writer:
            self.loggers = LoggerGroup([MetricsLogger(self.run_dir, rows=self.history), *extra_loggers])
            self.loggers.start(self.run_dir, self.config.to_dict(), start_epoch)
        if self.directory.resume:  # keep listing what earlier sessions skipped, though this scan may not see it
            self.skipped_before = self.directory.read_skipped()
        if self.data.report.skipped or self.skipped_before:
            self.write_skipped()

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
        self.directory.write_skipped(self.data.report.skipped, self.skipped_before, self.skipped_in_run)

    def step_hook(self, on_step: Callable[[dict], None] | None, epoch: int) -> Callable[[dict], None] | None:
        """What train_one_epoch calls after each step: ``on_step`` and the loggers that want steps (None when
        nobody does, which spares reading the loss back every step). Process 0 alone reports steps."""
        if not self.directory.writer or (on_step is None and not self.loggers.wants_steps):
            return None

        def hook(values: dict) -> None:
            values = {**values, "global_step": (epoch - 1) * self.steps_per_epoch + values["step"]}
            if on_step is not None:
                on_step(values)
            self.loggers.log_step(values)
        return hook

    def finish_loggers(self, result: dict | None = None) -> None:
        """Tell the loggers the run ended (``result`` None: with an error), once."""
        loggers, self.loggers = self.loggers, LoggerGroup([])
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
        """After each training step: checkpoint every --checkpoint-minutes and when Ctrl-C asks to stop; True stops.
        Processes agree on both, so that they all save (and stop) after the same step."""
        due = time.monotonic() - self.last_save >= self.config.checkpoint_minutes * 60
        device = next(self.model.parameters()).device
        self.stop.requested, due = self.processes.any([self.stop.requested, due], device)
        if self.stop.requested or due:
            self.check_finite(f"at epoch {epoch}, step {progress.step}")
            partial = {"epoch": epoch, "progress": progress.to_dict(self.processes), "rng": capture_rng_state()}
            if self.directory.writer:
                save_checkpoint(self.run_dir / LAST, self.checkpoint_state(epoch - 1, partial))
            self.last_save, self.saved_at = time.monotonic(), f"epoch {epoch}, step {progress.step}"
        return self.stop.requested

    def end_epoch(self, epoch: int, train: EpochStats, val: EpochStats, skipped: dict[str, str]) -> None:
        """Log and write the metrics, curves and checkpoints of a validated epoch; ``skipped`` holds the images
        the loaders (of every process) have skipped so far in this session."""
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
            "skipped_in_run": len(self.skipped_in_run), "peak_memory_mib": peak_memory_mib(self.model),
        }
        self.history.append(row)
        is_best = val.acc > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = val.acc, epoch
        if self.directory.writer:
            self._write_epoch(epoch, row, train, val, is_best)
        self.last_save, self.saved_at = time.monotonic(), f"epoch {epoch}"

    def _write_epoch(self, epoch: int, row: dict, train: EpochStats, val: EpochStats, is_best: bool) -> None:
        self.log(format_epoch_line(epoch, train.acc, train.loss, val.acc, val.loss, row["lr"],
                                   row["epoch_seconds"], train.images_per_s))
        self.loggers.log_epoch(row)
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
        save_checkpoint(self.run_dir / LAST, state)
        plot_curves(self.history, self.run_dir / "curves.png")
