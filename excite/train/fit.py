"""``fit``: one training run from a config to a run directory.

A run directory holds ``config.json``, ``metrics.csv`` / ``metrics.jsonl``, ``curves.png``,
``last.pt`` (every epoch, every ``checkpoint_minutes`` inside an epoch, and on Ctrl-C) and ``best.pt``
+ ``best.safetensors`` (best validation accuracy), and ``skipped_files.txt`` when unreadable images
were left out (by the scan of any session of the run, or because they broke during one). Checkpoints
are written atomically, so a run killed at any moment resumes from its last checkpoint with
``excite train --resume DIR``. The pieces: :mod:`~excite.train.run_directory` (the lock and the files that say
what ran), :mod:`~excite.train.loaders`, :mod:`~excite.train.run` (checkpoint state, what each step and epoch
write), :mod:`~excite.train.failures` (how a run that cannot go on ends) and :mod:`~excite.train.distributed`
(several processes under torchrun).

Randomness is a pure function of (seed, epoch): every epoch reseeds all generators and the data
order, and a mid-epoch checkpoint keeps the generators' state and the step, so a resumed run repeats
exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from excite.data import DataBundle, batch_mixer, build_data
from excite.data.transforms import describe_transform
from excite.environment import select_device
from excite.errors import CheckpointError, ExciteError, UnknownModelError
from excite.models import create_model, summary
from excite.models.pretrained import PretrainedWeights, resolve_pretrained
from excite.models.weights import load_weights
from excite.report.loggers import build_loggers
from excite.train.checkpoint import LAST, restore_rng_state
from excite.train.config import TrainConfig
from excite.train.distributed import Processes, for_training, processes
from excite.train.failures import resume_hint, resume_hint_on_refused_writes, training_failures
from excite.train.finetune import apply_freeze, follow_weights, is_frozen
from excite.train.loaders import build_loaders
from excite.train.loop import EpochProgress, Precision, ProgressDisplay, evaluate, train_one_epoch
from excite.train.optim import build_optimizer, build_scheduler, lr_factor
from excite.train.run import Run
from excite.train.run_directory import LOCK_FILE, RunDirectory, default_run_dir, resume_config

__all__ = ["LOCK_FILE", "RunResult", "default_run_dir", "epoch_seed", "fit", "resume_config", "seed_everything"]

#: The built-in sources, which are names rather than paths.
NAMED_SOURCES = ("digits", "cifar10", "cifar100")


@dataclass
class RunResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    history: list[dict]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible streams per epoch; 1_000_003 is prime so (seed, epoch) pairs do not collide.
    return seed * 1_000_003 + epoch


def _resolved(config: TrainConfig, data: DataBundle, use_cache: bool) -> TrainConfig:
    """``config`` with what "auto" and None resolved to for this data (size, preset, image cache) and the data
    paths made absolute, so that config.json says what ran and a resume from another folder finds the data."""
    def absolute(path: str | None) -> str | None:
        return path if path is None or path in NAMED_SOURCES else str(Path(path).expanduser().resolve())
    return dataclasses.replace(config, img_size=data.img_size, preset=data.preset, cache_images=use_cache,
                               batch_size=data.batch_size,  # cut to the training set's size when larger
                               data=absolute(config.data), data_root=absolute(config.data_root),
                               val_dir=absolute(config.val_dir))


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


def _precision(config: TrainConfig, device: torch.device) -> Precision:
    if device.type == "cuda":
        # Batches keep one shape (fixed image size; only an epoch's last batch may be smaller), so cuDNN's
        # per-shape choice of the fastest convolution kernels is made once or twice and pays for the whole run.
        torch.backends.cudnn.benchmark = True
    if config.amp == "fp16" and device.type != "cuda":
        raise ExciteError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")
    return Precision(device, config.amp, config.channels_last)


def _data(config: TrainConfig, checkpoint: dict | None, run_dir: Path) -> DataBundle:
    data = build_data(
        config.data, img_size=config.img_size, batch_size=config.batch_size, val_split=config.val_split,
        val_dir=config.val_dir, data_root=config.data_root, preset=config.preset, hflip=config.hflip,
        augment=config.augment, seed=config.seed, strict=config.strict, data_layout=config.data_layout,
        max_pixels=config.max_pixels, mean=config.mean, std=config.std, crop_pct=config.crop_pct,
        # A resumed run keeps the images on the side of the split they were on, whatever the folder now holds.
        recorded_split=checkpoint.get("split") if checkpoint is not None else None,
    )
    if checkpoint is not None and list(checkpoint["classes"]) != list(data.classes):
        raise CheckpointError(f"the classes of {run_dir}/last.pt do not match the data's; resume with the same data")
    return data


def _pretrained(config: TrainConfig, checkpoint: dict | None, place: Processes) -> PretrainedWeights | None:
    """The weights --pretrained names, fetched into their library's cache by process 0 first (the others then find
    them there); None on a resume, which continues from its own checkpoint."""
    if not config.pretrained or checkpoint is not None:
        return None
    weights = resolve_pretrained(config.pretrained, config.model) if place.is_main else None
    place.share(None)  # the others wait for process 0's download
    return weights or resolve_pretrained(config.pretrained, config.model)


def _model(config: TrainConfig, data: DataBundle, device: torch.device, weights: PretrainedWeights | None,
           log: Callable[[str], None]) -> torch.nn.Module:
    """The model of ``config`` for ``data`` on ``device``, starting from ``weights`` if any, checked to train on
    the data's images."""
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
    return model


def _start_epoch(run: Run, epoch: int, partial: dict | None, loader) -> EpochProgress:
    """Seed ``epoch``, freeze or unfreeze for it, and point ``loader`` at its first batch to train: the one after a
    mid-epoch checkpoint's step (``partial``), whose random state is restored too."""
    run.epoch = epoch
    seed_everything(epoch_seed(run.config.seed, epoch))
    progress = EpochProgress()
    if partial is not None:  # finish the epoch a mid-epoch checkpoint stopped in
        progress = run.resumed_progress(partial)
        restore_rng_state(partial["rng"])
    if freeze_note := apply_freeze(run.model, epoch, run.config):  # --freeze: a function of the epoch
        run.log(freeze_note)
    loader.set_epoch(epoch)
    if progress.step > len(loader):  # files went missing since the mid-epoch checkpoint
        run.log(f"The training set has shrunk since {run.run_dir / LAST} was saved at step {progress.step} of epoch "
                f"{epoch}: that epoch ends there")
    loader.set_epoch(epoch, start_batch=progress.step)
    return progress


def _quiet(line: str) -> None:
    """The log of processes other than 0: process 0 prints for all."""


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

    Started by torchrun (or inside a process group of the caller's), each process trains on its part of every
    batch with DistributedDataParallel; process 0 alone writes, logs and calls ``on_step`` and ``loggers``.
    """
    config.validate()
    extra_loggers = [*build_loggers(config.logger), *loggers]  # a missing TensorBoard fails before anything runs
    device = select_device(config.device)
    with processes(device) as place, ExitStack() as held:  # held: the run directory's lock, until fit() returns
        try:
            return _fit(config, resume, device, place, held, log if place.is_main else _quiet,
                        show_progress if place.is_main else False, on_step, extra_loggers)
        except ExciteError as e:
            e.quiet = getattr(e, "quiet", False) or not place.is_main  # process 0 says it for all
            if place.distributed:
                # The error's frames would keep the DDP model alive past the process group, and gloo's threads abort
                # the process when it is freed at exit; the traceback itself stays for --debug.
                traceback.clear_frames(e.__traceback__)
                if not place.is_main:
                    # Every process meets the error at the same step; torchrun stops the others as soon as one ends,
                    # so process 0, which reports it, gets a moment to do so.
                    time.sleep(2)
            raise


def _fit(config: TrainConfig, resume: bool, device: torch.device, place: Processes, held: ExitStack,
         log: Callable[[str], None], show_progress: Optional[bool], on_step: Optional[Callable[[dict], None]],
         extra_loggers: list) -> RunResult:
    directory, config, checkpoint = RunDirectory.open(config, resume, place, held)
    # A write the system refuses (a full disk) names its file and, once last.pt exists, how to continue.
    held.enter_context(resume_hint_on_refused_writes(directory.path))
    device = place.device(device)
    precision = _precision(config, device)
    seed_everything(config.seed)
    weights = _pretrained(config, checkpoint, place)
    requested, config = config, follow_weights(config, weights, log)  # the weights' input pipeline
    data = _data(config, checkpoint, directory.path)
    loaders = build_loaders(config, data, device, place)
    config = _resolved(config, data, loaders.cached)
    model = _model(config, data, device, weights, log)
    size = {**summary(model, img_size=data.img_size, device=device).to_dict(), "model_kwargs": model.model_kwargs}
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, len(loaders.train), config)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    run = Run(config, directory, data, model, optimizer, scheduler, scaler, log, len(loaders.train), place)
    start_epoch, partial = run.restore(checkpoint) if checkpoint is not None else (1, None)
    freezes = any(is_frozen(epoch, config) for epoch in range(start_epoch, config.epochs + 1))
    train_model = for_training(model, place, device, config.sync_bn, freezes)
    train_model = torch.compile(train_model) if config.compile else train_model

    directory.begin_session(config, requested, size, device, place)
    held.callback(run.finish_loggers)  # flushed however fit() ends; finish() below reports a success first
    run.begin(start_epoch, extra_loggers)
    _log_header(log, config, requested, data, loaders.source(device), place, directory.path, device, run, weights)
    if checkpoint is not None:
        _explain_schedule(checkpoint, config, start_epoch, len(loaders.train), log)

    display = ProgressDisplay(bar=sys.stderr.isatty() if show_progress is None else show_progress,
                              every_seconds=config.progress_seconds, log=log)
    mix = batch_mixer(len(data.classes), config.mixup, config.cutmix)
    with training_failures(run):
        for epoch in range(start_epoch, config.epochs + 1):
            progress = _start_epoch(run, epoch, partial, loaders.train)
            partial = None
            train = train_one_epoch(train_model, loaders.train, optimizer, scheduler, precision, epoch=epoch,
                                    label_smoothing=config.label_smoothing, scaler=scaler, mix=mix, display=display,
                                    progress=progress, on_step=run.step_hook(on_step, epoch), processes=place,
                                    after_step=functools.partial(run.save_mid_epoch, epoch))
            if train is None:
                raise run.stop.interrupted(f"at epoch {epoch}, step {progress.step}; saved in "
                                           f"{directory.path / LAST}. {resume_hint(directory.path)}")
            place.copy_buffers_from_main(model)
            val = evaluate(train_model if not place.distributed else model, loaders.val, precision,
                           len(data.classes), tta=config.tta, show_progress=display.bar, processes=place)
            run.end_epoch(epoch, train, val, place.merge(loaders.skipped()))
            if run.stop.requested:  # Ctrl-C while validating: the epoch is complete and saved
                raise run.stop.interrupted(f"after epoch {epoch}; saved in {directory.path / LAST}. "
                                           f"{resume_hint(directory.path)}")

    run.finish_loggers({"best_acc": run.best_acc, "best_epoch": run.best_epoch,
                        "final": run.history[-1] if run.history else None})
    log(f"Best validation accuracy {run.best_acc:.1%} at epoch {run.best_epoch}; files in {directory.path}")
    return RunResult(run_dir=directory.path, best_acc=run.best_acc, best_epoch=run.best_epoch, history=run.history)


def _log_header(log: Callable[[str], None], config: TrainConfig, requested: TrainConfig, data: DataBundle,
                source: str, place: Processes, run_dir: Path, device: torch.device, run: Run,
                weights: PretrainedWeights | None) -> None:
    if run.history or run.saved_at:
        log(f"Resuming {run_dir} from {run.saved_at}, to epoch {config.epochs}")
    if data.report.images:
        log(f"Scanned {config.data}: {data.report.summary()}")
    for note in data.notes:
        log(note)
    if data.report.skipped:
        log(f"Skipped {len(data.report.skipped)} unreadable file(s); see {run_dir / 'skipped_files.txt'}")
    where = f"{place.world_size} processes on {device.type}" if place.distributed else f"device {device}"
    log(f"Training {config.model} on {config.data}: {len(data.train)} train / {len(data.val)} val images, "
        f"{len(data.classes)} classes, {data.img_size}px, {where}, run directory {run_dir}")
    chooser = "the weights" if weights is not None and weights.preprocessing is not None else "--preset auto"
    preset_note = f" ({chooser} chose {data.preset})" if requested.preset == "auto" else ""
    pipeline = describe_transform(data.preset, data.img_size, hflip=config.hflip, augment=config.augment,
                                  mean=config.mean, std=config.std, crop_pct=config.crop_pct)
    batches = f"; batch {data.batch_size} = {place.world_size} x {data.batch_size // place.world_size}" \
        if place.distributed else ""
    log(f"Input{preset_note}: {pipeline}; {source}{batches}")


