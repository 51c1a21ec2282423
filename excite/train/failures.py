"""How a run ends when it cannot go on: the error translations of training, in one place.

Whatever stops a run (a NaN loss, Ctrl-C or SIGTERM, the GPU's memory running out, a disk that refuses a write)
ends it with one line that says what happened, what was saved and how to continue: checkpoints are written
atomically, so ``last.pt`` always holds a state training can resume from.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from excite.errors import ExciteError, NonFiniteLossError, RunInterrupted, WriteRefused
from excite.train.checkpoint import LAST

if TYPE_CHECKING:
    from excite.train.run import Run


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


@contextmanager
def resume_hint_on_refused_writes(run_dir: str | os.PathLike) -> Iterator[None]:
    """Within the block, a :class:`~excite.errors.WriteRefused` (a full disk, a read-only folder) says how to
    resume once the problem is fixed, but only when ``run_dir`` has a ``last.pt`` to resume from."""
    try:
        yield
    except WriteRefused as e:
        if not (Path(run_dir) / LAST).is_file():
            raise
        raise e.with_hint(f"the run continues with `excite train --resume {run_dir}` once this is fixed") \
            from e.__cause__


def resume_hint(run_dir: Path) -> str:
    return f"Continue with: excite train --resume {run_dir}"


@contextmanager
def training_failures(run: "Run") -> Iterator[None]:
    """Around the epochs of ``run``: a NaN loss, a second Ctrl-C and running out of GPU memory end the run with one
    line saying what ``last.pt`` holds and how to go on. Ctrl-C itself (the first one) is :class:`StopRequest`'s."""
    run_dir = run.run_dir
    try:
        with run.stop:
            yield
    except NonFiniteLossError as e:
        saved = (f"the last good checkpoint is {run_dir / LAST} ({run.saved_at})" if run.saved_at
                 else "no epoch had completed")
        raise NonFiniteLossError(f"{e}; {saved}") from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        # Asked of the disk, not of the loop: Ctrl-C can land after last.pt is renamed into place but before the
        # loop moves on.
        if not (run_dir / LAST).exists():
            raise RunInterrupted(f"interrupted during epoch {run.epoch}, before the first checkpoint; nothing to "
                                 "resume, start the run again") from None
        raise RunInterrupted(f"interrupted during epoch {run.epoch}; {run_dir / LAST} holds the last checkpoint. "
                             f"{resume_hint(run_dir)}") from None
    except torch.OutOfMemoryError:
        config, batch_size = run.config, run.data.batch_size
        raise ExciteError(
            f"out of GPU memory at --batch-size {batch_size} with {config.model} at {run.data.img_size}px; "
            f"try --batch-size {max(2, batch_size // 2)}" + ("" if config.amp else " or --amp bf16")
        ) from None
