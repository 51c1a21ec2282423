"""Scanning an image folder (``root/<class>/<image>``) once, checking every image, and splitting it.

Every candidate image is fully decoded by the decoder training uses, so a truncated JPEG is found now rather
than in epoch 7. Results are cached per file, keyed by (relative path, size, mtime), in
``cache_dir()/scans`` so that scanning an unchanged folder again decodes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from excite.data.images import UnreadableImage, decode_image, is_image_file
from excite.errors import DataError
from excite.io import atomic_write_text

#: Bump when the cached per-file result changes meaning, so old caches are ignored.
_SCAN_CACHE_VERSION = 1


def cache_dir() -> Path:
    """excite's cache folder: ``$EXCITE_CACHE_DIR``, else ``$XDG_CACHE_HOME/excite``, else ``~/.cache/excite``."""
    if os.environ.get("EXCITE_CACHE_DIR"):
        return Path(os.environ["EXCITE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "excite"


@dataclass
class ScanReport:
    """What scanning found besides usable images; the trainer writes it to the run directory.

    Paths are absolute. ``decoded`` counts the files checked by this scan; the rest came from the scan cache.
    """

    folders: list[str] = field(default_factory=list)
    images: int = 0
    decoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images: (path, reason)
    non_image: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def merge(self, other: ScanReport) -> ScanReport:
        """The report of both scans together (a training folder and its ``--val-dir``)."""
        return ScanReport(self.folders + other.folders, self.images + other.images, self.decoded + other.decoded,
                          self.skipped + other.skipped, self.non_image + other.non_image,
                          self.empty_classes + other.empty_classes)

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"{self.images} images"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable skipped")
        if self.non_image:
            parts.append(f"{len(self.non_image)} non-image files ignored")
        if self.empty_classes:
            parts.append(f"{len(self.empty_classes)} empty class folders dropped")
        return ", ".join(parts)

    def format_skipped(self) -> str:
        """The skipped images as text, one ``path: reason`` per line."""
        return "".join(f"{path}: {reason}\n" for path, reason in self.skipped)


@dataclass
class FolderScan:
    """The usable contents of one image folder."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (absolute path, class index), sorted by path
    largest_side: int  # longest image side in pixels over all usable images
    report: ScanReport


def _ignored(name: str) -> bool:
    # Hidden files and folders (.DS_Store, ._x AppleDouble files, .git) and macOS zip leftovers are not data.
    return name.startswith(".") or name == "__MACOSX"


def list_files(directory: Path) -> list[Path]:
    """Every file below ``directory``, sorted, leaving out hidden files and folders."""
    files = []
    for parent, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        files.extend(Path(parent, n) for n in names if not _ignored(n))
    return sorted(files)


def _cache_file(root: Path) -> Path:
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir() / "scans" / f"{key}.json"


def _load_cache(path: Path, root: Path) -> dict[str, dict]:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: scan everything again
        return {}
    if cached.get("version") != _SCAN_CACHE_VERSION or cached.get("root") != str(root):
        return {}
    return cached["files"]


def _check(path: Path) -> dict:
    try:
        image = decode_image(path)
    except UnreadableImage as error:
        return {"error": error.reason}
    return {"shape": list(image.shape[1:])}


def scan_folder(root: str | os.PathLike, *, strict: bool = False) -> FolderScan:
    """Find and check the images of an ImageFolder-layout directory ``root/<class>/<image>``.

    Classes are the sorted subfolder names. Hidden files and folders are ignored, files without an image
    extension are listed in the report as non-image, unreadable images are skipped and listed with the
    reason, class folders left without images are dropped. ``strict`` turns any unreadable image into a
    :class:`DataError`. Raises :class:`DataError` when ``root`` is missing or fewer than 2 classes remain.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: give a folder of class subfolders "
                        f"(root/<class>/<image>), or one of the sources 'digits', 'cifar10', 'cifar100'")
    report = ScanReport(folders=[str(root)])
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not _ignored(d.name))
    stats: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
    files_by_class: dict[str, list[str]] = {}
    for class_dir in class_dirs:
        files_by_class[class_dir.name] = []
        for path in list_files(class_dir):
            if not is_image_file(path.name):
                report.non_image.append(str(path))
                continue
            rel = path.relative_to(root).as_posix()
            try:
                st = path.stat()
            except OSError as error:  # e.g. a broken symbolic link
                report.skipped.append((str(path), f"{type(error).__name__}: {error}"))
                continue
            stats[rel] = (st.st_size, st.st_mtime_ns)
            files_by_class[class_dir.name].append(rel)

    cache_path = _cache_file(root)
    cached = _load_cache(cache_path, root)
    results = {rel: cached[rel] for rel, (size, mtime) in stats.items()
               if rel in cached and (cached[rel]["size"], cached[rel]["mtime_ns"]) == (size, mtime)}
    todo = [rel for rel in stats if rel not in results]
    if todo:
        # Threads, not processes: decoding releases the GIL, and on 2 cores a thread pool checked ~2 MP JPEGs
        # as fast as a process pool (~5 ms each) without the start-up cost. A cheaper partial decode (PIL draft
        # mode, ~25% faster) could disagree with the decoder used in training, so the scan uses that decoder.
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            checked = tqdm(pool.map(_check, [root / rel for rel in todo]), total=len(todo),
                           desc=f"checking images in {root.name}", unit="img", disable=None, leave=False)
            for rel, result in zip(todo, checked):
                results[rel] = {"size": stats[rel][0], "mtime_ns": stats[rel][1], **result}
    report.decoded = len(todo)
    if results != cached:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps({"version": _SCAN_CACHE_VERSION, "root": str(root), "files": results}))

    classes, samples, largest_side = [], [], 0
    for name, rels in files_by_class.items():
        readable = []
        for rel in rels:
            if "error" in results[rel]:
                report.skipped.append((str(root / rel), results[rel]["error"]))
            else:
                readable.append(rel)
                largest_side = max(largest_side, *results[rel]["shape"])
        if not readable:
            report.empty_classes.append(str(root / name))
            continue
        samples.extend((str(root / rel), len(classes)) for rel in readable)
        classes.append(name)
    report.images = len(samples)

    if strict and report.skipped:
        path, reason = report.skipped[0]
        raise DataError(f"{len(report.skipped)} unreadable image(s) in {root} (first: {path}: {reason}); "
                        f"fix or remove them, or run without strict mode to skip them")
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s) with readable images, need at least 2: "
                        f"put images in {root}/<class name>/")
    return FolderScan(root, classes, samples, largest_side, report)


def stratified_split(samples: list[tuple[str, int]], val_fraction: float,
                     seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split ``(path, label)`` samples into train and validation, keeping each class's proportion.

    Each class gives ``round(val_fraction * size)`` images to validation (but always keeps one for training).
    The split depends only on the samples and ``seed``, not on the order they are given in.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in sorted(samples):
        by_class.setdefault(sample[1], []).append(sample)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = min(round(val_fraction * len(members)), len(members) - 1)
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    if not val:
        raise DataError(f"validation fraction {val_fraction} leaves no validation images in {len(samples)} "
                        f"images: use a larger fraction or a separate validation folder")
    return sorted(train), sorted(val)
