"""Using a trained model: ``evaluate_checkpoint`` (metrics on a data set) and ``predict`` (top-k classes)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from excite.data import (
    DEFAULT_MAX_PIXELS,
    ImageFileDataset,
    build_data,
    build_transform,
    cifar_test_set,
    decode_image,
    make_loader,
    resolve_layout,
    scan_folder,
)
from excite.data.folder import list_files
from excite.data.images import is_image_file
from excite.data.loader import default_workers
from excite.data.sources import CIFAR
from excite.data.transforms import input_options
from excite.environment import select_device
from excite.errors import CheckpointError, DataError, ExciteError, first_line
from excite.io import atomic_write_json
from excite.nn.fold import fold_batchnorm
from excite.report.metrics import classification_report
from excite.report.plots import plot_confusion_matrix
from excite.train.checkpoint import LAST, load_checkpoint, model_from_checkpoint
from excite.train.config import EVAL_TTA_CHOICES
from excite.train.loop import Precision, evaluate, predict_logits


def load_for_inference(path: str | os.PathLike, device: torch.device, fold: bool = True):
    """Model (eval mode, on ``device``), class names, the eval transform and the checkpoint of a checkpoint or
    weights file.

    A run directory means its best weights (``best.pt`` or ``best.safetensors``), or its ``last.pt`` when it
    kept no best weights (``--save last``). With ``fold`` the model has
    its BatchNorms folded into the convolutions before them (:func:`~excite.nn.fold.fold_batchnorm`):
    the same function, fewer passes over the activations; without it, the modules are the model's own (for
    hooks on named layers).
    """
    path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(path)
    model, classes = model_from_checkpoint(checkpoint, path)
    transform = build_transform(checkpoint["preset"], checkpoint["img_size"], train=False,
                                **input_options(checkpoint.get("config", {})))
    return (fold_batchnorm(model) if fold else model.eval()).to(device), classes, transform, checkpoint


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The file :func:`load_for_inference` reads for ``path``: a file as it is; for a run directory its best
    weights (``best.pt`` with --save all, or ``best.safetensors``), else its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        return next((path / name for name in ("best.pt", "best.safetensors", LAST) if (path / name).exists()),
                    path / LAST)
    return path


def evaluate_checkpoint(checkpoint_path: str | os.PathLike, data: str, *, out: str | None = None,
                        batch_size: int = 128, device: str = "auto", split: str = "auto",
                        data_root: str | None = None, tta: str = "auto", log=print) -> dict:
    """Top-1/top-5, per-class precision/recall/F1 and a confusion matrix of a checkpoint on ``data``.

    ``split="val"`` evaluates the validation split the run itself held out (same seed and fraction);
    ``"all"`` every image of a folder; ``"test"`` the official test set of CIFAR; ``"auto"`` is ``val``
    when ``data`` is what the run trained on, else ``test`` for CIFAR and ``all`` for a folder.
    ``tta`` is ``"auto"`` (what the run validated with), ``"none"`` or ``"flip"``. Writes ``eval.json``
    and ``confusion_matrix.png`` into ``out`` (default: ``eval-<data>`` beside the checkpoint) and
    returns the metrics.
    """
    if batch_size < 1:
        raise ExciteError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = select_device(device)
    model, classes, transform, checkpoint = load_for_inference(checkpoint_path, torch_device)
    tta = resolve_tta(tta, checkpoint.get("config", {}))
    dataset, split = eval_dataset(checkpoint_path, checkpoint, classes, transform, data, split=split,
                                  data_root=data_root, log=log)
    loader = make_loader(dataset, batch_size, train=False, workers=default_workers(torch_device))
    stats = evaluate(model, loader, Precision(torch_device), len(classes), tta=tta)
    report = classification_report(stats.confusion, classes)
    result = {"checkpoint": str(checkpoint_path), "data": str(data), "split": split, "tta": tta, "images": stats.images,
              "top1": stats.acc, "top5": stats.top5, "loss": stats.loss, **report}
    out_dir = Path(out) if out else checkpoint_dir(checkpoint_path) / f"eval-{Path(str(data)).name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "eval.json", result)
    plot_confusion_matrix(stats.confusion, classes, out_dir / "confusion_matrix.png")
    log(f"{stats.images} images: top-1 {stats.acc:.2%}, top-5 {stats.top5:.2%}, loss {stats.loss:.4f}")
    for name, row in report["per_class"].items():
        log(f"  {name:>20}: precision {row['precision']:.3f} recall {row['recall']:.3f} f1 {row['f1']:.3f} "
            f"support {row['support']}")
    log(f"Wrote {out_dir / 'eval.json'} and {out_dir / 'confusion_matrix.png'}")
    return result


def eval_dataset(checkpoint_path: str | os.PathLike, checkpoint: dict, classes: Sequence[str], transform, data: str, *,
                 split: str = "auto", data_root: str | None = None, log=print) -> tuple[Dataset, str]:
    """The images a checkpoint is evaluated on, and the split they are: see :func:`evaluate_checkpoint`'s
    ``split``. Raises a one-line error when the split does not apply to ``data`` or its classes are not the
    checkpoint's."""
    config = checkpoint.get("config", {})
    trained_on = str(config.get("data", ""))
    is_cifar = data in CIFAR
    if split == "auto":
        split = "val" if trained_on and _same_source(trained_on, data) else "test" if is_cifar else "all"
    if (split == "test") != is_cifar and split != "val":
        raise ExciteError(f"--split {split} does not apply to {data}: use val or "
                          + ("test for CIFAR" if is_cifar else "all for a folder"))
    data_root = data_root or config.get("data_root")
    if split == "test":
        dataset = cifar_test_set(data, img_size=checkpoint["img_size"], preset=checkpoint["preset"],
                                 data_root=data_root, **input_options(config))
        data_classes = dataset.classes
    elif split == "val":
        bundle = build_data(data, img_size=checkpoint["img_size"], batch_size=1, preset=checkpoint["preset"],
                            recorded_split=_recorded_split(checkpoint_path, checkpoint),
                            val_split=config.get("val_split", 0.2), val_dir=config.get("val_dir"),
                            seed=config.get("seed", 0), data_root=data_root,
                            data_layout=config.get("data_layout", "auto"),
                            max_pixels=config.get("max_pixels", DEFAULT_MAX_PIXELS), **input_options(config))
        dataset, data_classes = bundle.val, bundle.classes
    else:
        train_root, val_root, _ = resolve_layout(data, config.get("data_layout", "auto"))
        if val_root is not None:  # a folder split into train/ and val/ (or test/): the part training does not see
            log(f"Evaluating {val_root}, the {val_root.name}/ part of {data}")
        scan = scan_folder(val_root or train_root, max_pixels=config.get("max_pixels", DEFAULT_MAX_PIXELS))
        dataset, data_classes = ImageFileDataset(scan.samples, scan.classes, transform), scan.classes
    if list(data_classes) != list(classes):
        raise CheckpointError(
            f"the checkpoint was trained on classes {_short(classes)} but {data} has {_short(data_classes)}; "
            "evaluate on data with the same class folders")
    return dataset, split


def predict(checkpoint_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, topk: int = 3,
            device: str = "auto", batch_size: int = 64, tta: str = "auto",
            log_error=None) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """Yield ``(path, [(class, probability), ...])`` for each image in ``inputs`` (files or folders,
    searched recursively). Unreadable images are reported through ``log_error`` and skipped; when none of
    them could be read, :class:`~excite.errors.DataError` says so instead, in one line. ``tta`` as in
    :func:`evaluate_checkpoint`."""
    check_predict_sizes(topk, batch_size)
    torch_device = select_device(device)
    model, classes, transform, checkpoint = load_for_inference(checkpoint_path, torch_device)
    tta = resolve_tta(tta, checkpoint.get("config", {}))
    yield from classify(lambda images: predict_logits(model, images.to(torch_device), tta), inputs, classes,
                        transform, topk=topk, batch_size=batch_size, log_error=log_error)


def check_predict_sizes(topk: int, batch_size: int) -> None:
    """One-line errors for a ``--topk`` or ``--batch-size`` below 1."""
    if topk < 1:
        raise ExciteError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ExciteError(f"--batch-size must be at least 1, got {batch_size}")


@torch.no_grad()
def classify(logits_of, inputs: Sequence[str | os.PathLike], classes: Sequence[str], transform, *, topk: int = 3,
             batch_size: int = 64, log_error=None) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """:func:`predict`'s loop for any model: ``logits_of`` maps a batch of transformed images (a CPU tensor)
    to their logits (a tensor); images come from ``inputs`` through ``transform``, as in :func:`predict`."""
    paths = expand_inputs(inputs)
    k = min(topk, len(classes))
    skipped: list[str] = []  # held back until an image is read: if none is, the error alone says why
    read = 0
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for path in paths[start:start + batch_size]:
            try:
                batch.append(transform(decode_image(path)))
                names.append(str(path))
            except DataError as e:
                skipped.append(f"{path}: {first_line(e)}")
        if not batch:
            continue
        read += len(batch)
        for problem in skipped:
            (log_error or warn)(f"skipping {problem}")
        skipped = []
        probs = logits_of(torch.stack(batch)).float().softmax(1).cpu()
        values, indices = probs.topk(k, dim=1)
        for name, vals, idxs in zip(names, values.tolist(), indices.tolist()):
            yield name, [(classes[i], v) for i, v in zip(idxs, vals)]
    if read == 0:
        raise DataError(f"none of the {len(paths)} inputs could be read as an image (first {skipped[0]}): give "
                        "image files, or folders of them")
    for problem in skipped:  # the unreadable images after the last batch with a readable one
        (log_error or warn)(f"skipping {problem}")


def _recorded_split(path: str | os.PathLike, checkpoint: dict) -> dict | None:
    """The train/validation split the run recorded: in the checkpoint, or for a weights file, in the last.pt of
    its run directory. None for runs from before excite recorded it (the split is then drawn again)."""
    if checkpoint.get("split") is not None:
        return checkpoint["split"]
    last = checkpoint_dir(path) / "last.pt"
    if Path(path).resolve() != last.resolve() and last.is_file():
        return load_checkpoint(last).get("split")
    return None


def resolve_tta(tta: str, config: dict) -> str:
    """The test-time augmentation to use, "none" or "flip", for ``tta`` and a run's ``config`` (for "auto")."""
    if tta not in EVAL_TTA_CHOICES:
        raise ExciteError(f"--tta {tta!r} is not valid: choose one of {', '.join(EVAL_TTA_CHOICES)}")
    if tta == "auto":
        return config.get("tta") or "none"  # checkpoints from before --tta existed have none
    return tta


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files and folders as a list of files: each folder's image files, searched recursively."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += [p for p in list_files(item) if is_image_file(p.name)]
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item} does not exist: give image files or folders of images")
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def _same_source(a: str, b: str) -> bool:
    if a in ("digits", *CIFAR) or b in ("digits", *CIFAR):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint path: the path itself when it is a folder, else its parent."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def warn(message: str) -> None:
    """One ``excite: warning:`` line on stderr."""
    print(f"excite: warning: {message}", file=sys.stderr)
