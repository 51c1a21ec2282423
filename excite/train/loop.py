"""One epoch of training, one pass of evaluation. Nothing here knows about files or flags."""
from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from excite.errors import ExciteError, NonFiniteLossError
from excite.report.metrics import confusion_matrix
from excite.train.distributed import Processes

ONE_PROCESS = Processes()

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How tensors reach the model: device, autocast dtype and memory format."""

    device: torch.device
    amp: Optional[str] = None
    channels_last: bool = False

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def to_device(self, images: torch.Tensor, targets: torch.Tensor):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking, memory_format=memory_format)
        return images, targets.to(self.device, non_blocking=non_blocking)


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float
    top5: float = float("nan")
    confusion: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _progress(loader: Iterable, desc: str, show: bool):
    return tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressDisplay:
    """What a training epoch shows while it runs.

    On a terminal (``bar``), a tqdm bar whose postfix holds the running loss, accuracy, learning rate and
    images/s. Elsewhere (a log file, a notebook, ``nohup``), one plain line through ``log`` every
    ``every_seconds`` (0: none). Reading the running sums waits for the device, so both refresh at most
    about once a second, never on every step.
    """

    def __init__(self, *, bar: bool, every_seconds: float = 30.0, log: Callable[[str], None] = print) -> None:
        self.bar, self.every_seconds, self.log = bar, every_seconds, log
        self.refresh_seconds = 1.0 if bar else every_seconds

    def wrap(self, loader: Iterable, desc: str):
        """``loader``, with a progress bar when there is a terminal."""
        return _progress(loader, desc, self.bar)

    def start(self) -> None:
        self._last = time.perf_counter()

    def update(self, bar, progress: "EpochProgress", total: int, epoch: int, lr: float) -> None:
        """After a step: refresh the bar's numbers or print a line, if it is time to."""
        now = time.perf_counter()
        if not (self.bar or self.every_seconds > 0) or now - self._last < self.refresh_seconds:
            return
        self._last = now
        seen = max(progress.seen, 1)
        loss, acc = float(progress.loss_sum) / seen, int(progress.correct) / seen
        rate = progress.seen / progress.seconds if progress.seconds > 0 else 0.0
        if self.bar:
            bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.1%}, lr {lr:.2E}, {rate:.0f} img/s", refresh=False)
        else:
            left = (total - progress.step) * progress.seconds / max(progress.step, 1)
            self.log(f"  epoch {epoch} step {progress.step}/{total} ({progress.step / max(total, 1):.0%}): "
                     f"loss {loss:.3f}, acc {acc:.1%}, lr {lr:.2E}, {rate:.0f} img/s, {_duration(left)} left")


@dataclass
class EpochProgress:
    """How far a training epoch has come: what a mid-epoch checkpoint keeps and a resumed epoch starts from.

    ``loss_sum`` and ``correct`` stay tensors on the training device while the epoch runs, so keeping
    count does not wait for the GPU; :meth:`to_dict` reads them out.
    """

    step: int = 0  # optimizer steps done
    seen: int = 0  # training images seen
    loss_sum: float | torch.Tensor = 0.0
    correct: int | torch.Tensor = 0
    seconds: float = 0.0

    def to_dict(self, processes: Processes = ONE_PROCESS) -> dict:
        """The progress as plain numbers; with several ``processes`` (all of which must call this at the same
        step), the images seen, loss and hits of all of them together."""
        seen, loss_sum, correct = self.totals(processes)
        return {"step": self.step, "seen": seen, "loss_sum": loss_sum, "correct": correct, "seconds": self.seconds}

    def totals(self, processes: Processes = ONE_PROCESS) -> tuple[int, float, int]:
        """Images seen, loss sum and correct predictions so far, summed over ``processes``."""
        if not processes.distributed:
            return self.seen, float(self.loss_sum), int(self.correct)
        device = torch.as_tensor(self.loss_sum).device
        summed = processes.sum(torch.tensor([self.seen, float(self.loss_sum), int(self.correct)],
                                            dtype=torch.float64, device=device)).tolist()
        return int(summed[0]), summed[1], int(summed[2])


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    precision: Precision,
    *,
    epoch: int,
    label_smoothing: float = 0.0,
    scaler: Optional[torch.amp.GradScaler] = None,
    mix: Optional[Callable] = None,
    show_progress: bool = False,
    display: Optional[ProgressDisplay] = None,
    progress: Optional[EpochProgress] = None,
    after_step: Optional[Callable[[EpochProgress], bool]] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    processes: Processes = ONE_PROCESS,
) -> Optional[EpochStats]:
    """Train for one pass over ``loader``; the scheduler steps every batch.

    ``display`` says how to show progress (default: a bar without numbers when ``show_progress``).
    ``progress`` continues an epoch that a checkpoint interrupted (the loader must then start at its
    step). ``after_step(progress)`` runs after every optimizer step; when it returns True the epoch
    stops there and the function returns None. ``on_step``, when given, receives every step's
    ``{"epoch", "step", "lr", "loss"}`` (the learning rate that step used, the loss as a float: this reads
    the loss back from the device every step, so only loggers that want per-step values should ask).
    Under several ``processes`` each trains on its part of every batch and the statistics returned are those
    of all of them.

    Raises NonFiniteLossError on the first step whose loss is NaN or infinite, before that step
    touches the weights. (With fp16 the GradScaler may still skip steps whose *gradients* overflow;
    that is its normal working, not a failure.)
    """
    model.train()
    progress = progress or EpochProgress()
    display = display or ProgressDisplay(bar=show_progress, every_seconds=0)
    display.start()
    total = progress.step + len(loader)  # the loader of a resumed epoch starts at progress.step
    lr = optimizer.param_groups[0]["lr"]
    begun = time.perf_counter() - progress.seconds
    progress.loss_sum = torch.as_tensor(progress.loss_sum, dtype=torch.float32, device=precision.device)
    progress.correct = torch.as_tensor(progress.correct, dtype=torch.long, device=precision.device)
    with warnings.catch_warnings():
        # A step the GradScaler skipped (fp16 gradients overflowed) makes torch warn that the scheduler
        # stepped first; the schedule is a function of the step count, so it stays on course.
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
        bar = display.wrap(loader, f"epoch {epoch}")
        for step, (images, targets) in enumerate(bar, progress.step):
            lr = optimizer.param_groups[0]["lr"]  # what this step trains with; the scheduler moves it after
            images, targets = precision.to_device(images, targets)
            loss_targets = targets
            if mix is not None:  # mixup/cutmix: the loss sees soft targets, accuracy the original labels
                images, loss_targets = mix(images, targets)
            with precision.autocast():
                logits = model(images)
                loss = F.cross_entropy(logits.float(), loss_targets, label_smoothing=label_smoothing)
            n = targets.shape[0]
            batch_loss, backpropagated = loss, loss
            if processes.distributed:
                batch_loss, backpropagated = _whole_batch_loss(loss, n, processes)
            if not torch.isfinite(batch_loss):  # every process sees the same batch loss, so all stop together
                raise NonFiniteLossError(
                    f"the training loss became {batch_loss.item()} at epoch {epoch}, step {step + 1}; the weights were "
                    "not updated with it. Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(backpropagated).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                backpropagated.backward()
                optimizer.step()
            scheduler.step()
            progress.step, progress.seen = step + 1, progress.seen + n
            progress.loss_sum += loss.detach() * n
            progress.correct += (logits.argmax(1) == targets).sum()
            progress.seconds = time.perf_counter() - begun
            if on_step is not None:
                on_step({"epoch": epoch, "step": step + 1, "lr": lr, "loss": batch_loss.item()})
            display.update(bar, progress, total, epoch, lr)
            if after_step is not None and after_step(progress):
                return None
    seen, loss_sum, correct = progress.totals(processes)
    if seen == 0:
        raise ExciteError("the training loader produced no batches: is the training set empty?")
    seconds = time.perf_counter() - begun
    return EpochStats(loss=loss_sum / seen, acc=correct / seen, images=seen, seconds=seconds)


def _whole_batch_loss(loss: torch.Tensor, n: int, processes: Processes) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss of the whole batch (all processes' parts), and what this process backpropagates.

    DistributedDataParallel averages the processes' gradients. Weighting each process's mean loss by its share of
    the batch makes that average the gradient of the whole batch's mean loss, as one process computes it, also
    when the parts differ in size.
    """
    summed = processes.sum(torch.stack([loss.detach() * n, loss.new_tensor(float(n))]))
    return summed[0] / summed[1], loss * (n * processes.world_size / summed[1])


def predict_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """``model(images)`` in float32; with ``tta="flip"`` averaged with the logits of the mirrored images."""
    logits = model(images).float()
    if tta == "flip":
        logits = (logits + model(images.flip(-1)).float()) / 2
    elif tta != "none":
        raise ValueError(f"tta must be 'none' or 'flip', got {tta!r}")
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    precision: Precision,
    num_classes: int,
    *,
    tta: str = "none",
    show_progress: bool = False,
    processes: Processes = ONE_PROCESS,
) -> EpochStats:
    """Loss, top-1, top-5 and the confusion matrix (rows: true class, columns: predicted) in eval mode,
    of the logits of :func:`predict_logits` with ``tta``. Under several ``processes`` each evaluates its part of
    the set and the results are those of the whole set."""
    model.eval()
    start = time.perf_counter()
    # Sums stay on the device and are read once at the end, so evaluation never waits on the GPU per batch.
    loss_sum = torch.zeros((), device=precision.device)
    top5_hits = torch.zeros((), dtype=torch.long, device=precision.device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=precision.device)
    seen = 0
    for images, targets in _progress(loader, "eval", show_progress):
        images, targets = precision.to_device(images, targets)
        with precision.autocast():
            logits = predict_logits(model, images, tta)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        top5_hits += (logits.topk(min(5, num_classes), dim=1).indices == targets[:, None]).any(1).sum()
        confusion += confusion_matrix(logits.argmax(1), targets, num_classes)
        seen += targets.shape[0]
    if processes.distributed:  # one all-reduce of every sum; counts are exact in float64
        summed = processes.sum(torch.cat([loss_sum.double().view(1), top5_hits.double().view(1),
                                          loss_sum.new_tensor([seen], dtype=torch.float64),
                                          confusion.double().flatten()]))
        loss_sum, top5_hits, seen = summed[0], summed[1].long(), int(summed[2])
        confusion = summed[3:].long().view(num_classes, num_classes)
    if seen == 0:
        raise ExciteError("the evaluation set is empty: use a larger --val-split or check --val-dir")
    confusion = confusion.cpu()
    seconds = time.perf_counter() - start
    return EpochStats(loss=loss_sum.item() / seen, acc=confusion.diag().sum().item() / seen, images=seen,
                      seconds=seconds, top5=top5_hits.item() / seen, confusion=confusion)
