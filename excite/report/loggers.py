"""Run loggers: what :func:`excite.fit` tells about a run as it trains, as plain dicts, not formatted lines.

A logger is any object with some of these methods (each is optional):

- ``start(run_dir, config, start_epoch)``: the run directory is ready; ``config`` is the resolved config as a
  dict; ``start_epoch`` is 1, or the epoch a resumed run continues with.
- ``log_step(values)``: after each training step, ``{"epoch", "step", "global_step", "lr", "loss"}``; only
  called for loggers whose ``wants_steps`` is true, since reading the loss back waits for the device.
- ``log_epoch(row)``: after each validated epoch, the row :file:`metrics.jsonl` gets (``epoch``, ``train_acc``,
  ``val_acc``, ``lr``, ...).
- ``finish(result)``: the run ended; ``result`` holds ``best_acc``, ``best_epoch`` and the last row, or is None
  when the run stopped with an error (the logger should still flush what it has).

A plain function is an epoch logger: it receives each epoch's row. :class:`~excite.report.metrics.MetricsLogger`
(the run's ``metrics.csv`` and ``metrics.jsonl``) is one; :class:`TensorBoardLogger` is another.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from excite.errors import ExciteError

#: What ``--logger`` accepts.
LOGGERS = ("tensorboard",)


class _EpochFunction:
    """A plain function used as a logger: it gets each epoch's row."""

    def __init__(self, function: Callable[[dict], Any]) -> None:
        self.log_epoch = function


def as_logger(obj: Any) -> Any:
    """``obj`` itself when it has logger methods, else a logger that passes each epoch's row to it."""
    if any(hasattr(obj, name) for name in ("start", "log_step", "log_epoch", "finish")):
        return obj
    if callable(obj):
        return _EpochFunction(obj)
    raise TypeError(f"a logger needs start/log_step/log_epoch/finish methods or must be callable, got {obj!r}")


class LoggerGroup:
    """Several loggers called in order, each only for the methods it has."""

    def __init__(self, loggers: Iterable[Any]) -> None:
        self.loggers = [as_logger(logger) for logger in loggers]

    @property
    def wants_steps(self) -> bool:
        return any(getattr(logger, "wants_steps", False) for logger in self.loggers)

    def _call(self, method: str, *args: Any, steps_only: bool = False) -> None:
        for logger in self.loggers:
            if steps_only and not getattr(logger, "wants_steps", False):
                continue
            if hasattr(logger, method):
                getattr(logger, method)(*args)

    def start(self, run_dir: Path, config: dict, start_epoch: int) -> None:
        self._call("start", run_dir, config, start_epoch)

    def log_step(self, values: dict) -> None:
        self._call("log_step", values, steps_only=True)

    def log_epoch(self, row: dict) -> None:
        self._call("log_epoch", row)

    def finish(self, result: dict | None) -> None:
        self._call("finish", result)


class TensorBoardLogger:
    """TensorBoard event files in the run directory itself, so ``tensorboard --logdir runs/`` shows every run
    (and every run of a sweep) side by side: the epoch metrics as scalars (``train/acc``, ``val/loss``, ``lr``,
    ...), every ``step_every``-th step's loss and learning rate when ``step_every`` is set, and at the end the
    run's options as hyperparameters with its best and final accuracy.

    A resumed run drops what its killed session wrote after the epoch it continues from, so the curves have
    no doubled stretch.
    """

    def __init__(self, step_every: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ExciteError("--logger tensorboard needs TensorBoard: pip install 'excite[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.step_every = step_every
        self.wants_steps = step_every > 0
        self.writer = None
        self.config: dict = {}

    def start(self, run_dir: Path, config: dict, start_epoch: int) -> None:
        self.config = config
        # Epoch-level scalars use the epoch as their step; purge_step removes events a killed session wrote
        # for epochs that this session trains again.
        self.writer = self._writer_class(log_dir=os.fspath(run_dir), purge_step=start_epoch)

    def log_step(self, values: dict) -> None:
        if values["global_step"] % self.step_every == 0:
            self.writer.add_scalar("step/loss", values["loss"], values["global_step"])
            self.writer.add_scalar("step/lr", values["lr"], values["global_step"])

    def log_epoch(self, row: dict) -> None:
        epoch = row["epoch"]
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            split, _, metric = key.partition("_")
            name = f"{split}/{metric}" if split in ("train", "val") and metric else key
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def finish(self, result: dict | None) -> None:
        if self.writer is None:
            return
        if result is not None:
            # TensorBoard's hparams plugin takes numbers, strings and booleans; other values are shown as text.
            hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in self.config.items() if key not in ("out", "requested", "run_id")}
            final = result.get("final") or {}
            metrics = {"hparam/best_val_acc": result["best_acc"], "hparam/best_epoch": result["best_epoch"],
                       "hparam/final_val_acc": final.get("val_acc", float("nan"))}
            self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()


def build_loggers(name: str | None, step_every: int = 0) -> list[Any]:
    """The loggers ``--logger NAME`` turns on (none for None)."""
    if name is None:
        return []
    if name == "tensorboard":
        return [TensorBoardLogger(step_every=step_every)]
    raise ExciteError(f"--logger {name!r} is not valid: choose one of {', '.join(LOGGERS)}")
