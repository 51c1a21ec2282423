"""Scanning an image folder (``root/<class>/<image>``) once, checking every image, and splitting it.

Every candidate image is fully decoded by the decoder training uses, so a truncated JPEG is found now rather
than in epoch 7. Results are cached per file, keyed by (relative path, size, mtime), in
``cache_dir()/scans`` so that scanning an unchanged folder again decodes nothing. Symbolic links are
followed, but every folder and every file is taken once: a link loop (``cat/loop -> ..``) or a second way to
the same image adds nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from excite.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, UnreadableImage, decode_image, is_image_file
from excite.errors import DataError
from excite.io import atomic_write_text

#: Bump when the cached per-file result changes meaning, so old caches are ignored.
_SCAN_CACHE_VERSION = 2
#: What ``data_layout`` may be: "auto" recognises a folder split into train/ and val/ (or test/), "classes" takes
#: every top-level folder as a class.
LAYOUTS = ("auto", "classes")
#: Top-level folder names (lower-cased) of a split folder, and the validation ones in order of preference.
TRAIN_FOLDER = "train"
VAL_FOLDERS = ("val", "valid", "validation", "test")


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
    links_skipped: list[str] = field(default_factory=list)  # links to folders already scanned (loops, repeats)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path left out, the path kept) of one file

    def merge(self, other: ScanReport) -> ScanReport:
        """The report of both scans together (a training folder and its validation folder)."""
        return ScanReport(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"{self.images} images"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable skipped")
        if self.non_image:
            parts.append(f"{len(self.non_image)} non-image files ignored")
        if self.empty_classes:
            parts.append(f"{len(self.empty_classes)} empty class folders dropped")
        if self.links_skipped:
            n = len(self.links_skipped)
            parts.append(f"{n} symbolic link{'s' if n > 1 else ''} to folders already scanned "
                         f"{'were' if n > 1 else 'was'} skipped")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} more paths to images already found left out")
        return ", ".join(parts)

    def format_skipped(self) -> str:
        """The skipped images as the text of ``skipped_files.txt`` (see :func:`format_skipped_lines`)."""
        return format_skipped_lines(self.skipped)


# skipped_files.txt: one "path<TAB>reason" line per file, with backslash, tab, newline and carriage return
# escaped in both fields, so that any file name (Linux allows all but "/" and NUL) reads back as it was.
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape(text: str) -> str:
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            escaped = next(chars, "")
            if escaped not in _UNESCAPES:
                raise ValueError(f"unknown escape \\{escaped} in {text!r}")
            c = _UNESCAPES[escaped]
        out.append(c)
    return "".join(out)


def format_skipped_lines(entries: Iterable[tuple[str, str]]) -> str:
    """``(path, reason)`` pairs as ``skipped_files.txt`` holds them: one ``path<TAB>reason`` line each, with
    ``\\``, tab, newline and carriage return written as ``\\\\``, ``\\t``, ``\\n``, ``\\r`` in both fields."""
    return "".join(f"{_escape(path)}\t{_escape(reason)}\n" for path, reason in entries)


def parse_skipped_lines(text: str) -> dict[str, str]:
    """The ``path -> reason`` entries of a text written by :func:`format_skipped_lines` (exactly as they were
    written); raises ``ValueError`` for a line not in that format."""
    entries = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"line {number} is not 'path<TAB>reason'")
        entries[_unescape(fields[0])] = _unescape(fields[1])
    return entries


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


def _unlistable(folder: Path, error: OSError) -> DataError:
    return DataError(f"cannot read folder {folder} ({error.strerror or error}): fix its permissions "
                     f"(e.g. chmod -R u+rX '{folder}') or move it out of the data")


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not hidden, sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not _ignored(e.name)), key=lambda e: e.name)
    except OSError as error:
        raise _unlistable(folder, error) from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links
    except OSError:  # a link that cannot be followed: a file whose reading will say why
        return False


class _Walk:
    """Lists the files below some folders so that each real folder is walked once, whatever the symbolic links.

    The real folders below the tops come first, then the linked ones in sorted order, so a link never takes a
    folder from the top it really lies in; a link to a folder walked already (a loop, a second link) is left out
    and listed in :attr:`links_skipped`.
    """

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()  # (device, inode) of every folder entered
        self.links_skipped: list[str] = []

    def enter(self, folder: Path) -> bool:
        """Mark ``folder`` walked; False if it was already."""
        try:
            st = os.stat(folder)
        except OSError as error:
            raise _unlistable(folder, error) from None
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def files(self, tops: list[Path]) -> list[list[tuple[Path, str]]]:
        """For each of ``tops``: its files as ``(path, real path)``, sorted by path."""
        found: list[list[tuple[Path, str]]] = [[] for _ in tops]
        links: list[tuple[int, str]] = []  # a heap of (index of the top, link path)
        for i, top in enumerate(tops):
            if self.enter(top):
                self._walk(top, os.path.realpath(top), found[i], links, i)
            else:
                self.links_skipped.append(str(top))
        while links:
            i, link = heapq.heappop(links)
            if self.enter(Path(link)):
                self._walk(Path(link), os.path.realpath(link), found[i], links, i)
            else:
                self.links_skipped.append(link)
        return [sorted(files) for files in found]

    def _walk(self, top: Path, real_top: str, files: list, links: list, index: int) -> None:
        stack = [(top, real_top)]
        while stack:
            folder, real = stack.pop()
            for entry in _entries(folder):
                path = folder / entry.name
                if not _is_dir(entry):
                    real_path = os.path.realpath(path) if entry.is_symlink() else os.path.join(real, entry.name)
                    files.append((path, real_path))
                elif entry.is_symlink():
                    heapq.heappush(links, (index, str(path)))
                elif self.enter(path):
                    stack.append((path, os.path.join(real, entry.name)))
                else:  # a real folder met again (a bind mount, or below a linked top): already walked
                    self.links_skipped.append(str(path))


def list_files(directory: str | os.PathLike) -> list[Path]:
    """Every file below ``directory``, sorted, leaving out hidden files and folders; a folder reached twice
    through symbolic links is listed once. Raises :class:`DataError` for a folder that cannot be read."""
    walk = _Walk()
    return [path for path, _ in walk.files([Path(directory)])[0]]


def resolve_layout(root: str | os.PathLike, data_layout: str = "auto") -> tuple[Path, Path | None, str | None]:
    """Where the training and the validation images of the image folder ``root`` are:
    ``(training folder, validation folder or None, note or None)``.

    With ``data_layout`` "auto", a folder whose top-level folders are ``train`` and one or more of ``val``,
    ``valid``, ``validation``, ``test`` (in any case), each holding class folders, is split that way: train/
    trains, the first of those validates, and the note says so. Otherwise, and with "classes", the top-level
    folders are the classes: ``(root, None, None)``. Raises :class:`DataError` for a split folder that also
    holds other folders, or whose validation folder holds no class folders.
    """
    if data_layout not in LAYOUTS:
        raise DataError(f"unknown data layout {data_layout!r}: choose one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser().resolve()
    if data_layout == "classes" or not root.is_dir():
        return root, None, None
    folders = [root / e.name for e in _entries(root) if _is_dir(e)]
    splits: dict[str, Path] = {}
    for folder in folders:
        name = folder.name.lower()
        if name in (TRAIN_FOLDER, *VAL_FOLDERS):
            if name in splits:
                raise DataError(f"{root} has two folders named {name}: {splits[name].name}/ and {folder.name}/; "
                                "keep one")
            splits[name] = folder
    if TRAIN_FOLDER not in splits or len(splits) < 2 or not _has_folders(splits[TRAIN_FOLDER]):
        return root, None, None
    names = ", ".join(f"{f.name}/" for f in splits.values())
    others = [f.name for f in folders if f not in splits.values()]
    if others:
        raise DataError(f"{root} holds the split folders {names} and other folders too ({', '.join(others)}): "
                        "move those out, or pass --data-layout classes to make every top-level folder a class")
    train = splits[TRAIN_FOLDER]
    val = next(splits[name] for name in VAL_FOLDERS if name in splits)
    if not _has_folders(val):
        raise DataError(f"{val} holds no class folders: put its images in {val}/<class>/, or pass --data-layout "
                        f"classes to make every top-level folder of {root} a class")
    unused = [f"{f.name}/" for f in splits.values() if f not in (train, val)]
    note = (f"{root} is split into {names}: training on {train.name}/, validating on {val.name}/"
            + (f", not using {', '.join(unused)}" if unused else "")
            + " (--data-layout classes would make them classes)")
    return train, val, note


def _has_folders(folder: Path) -> bool:
    return any(_is_dir(entry) for entry in _entries(folder))


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


def _save_cache(path: Path, root: Path, results: dict[str, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": _SCAN_CACHE_VERSION, "root": str(root), "files": results}))
    except OSError as error:  # a read-only or full cache folder costs the next scan its speed, never the run
        warnings.warn(f"cannot write the scan cache into {path.parent} ({error.strerror or error}); going on "
                      "without it: set EXCITE_CACHE_DIR to a writable folder to keep it", stacklevel=2)


def _check(path: Path, max_pixels: int) -> dict:
    try:
        image = decode_image(path, max_pixels)
    except ImageTooLarge as error:  # never decoded: a larger limit next time must check it then
        return {"shape": [error.height, error.width], "unchecked": True}
    except UnreadableImage as error:
        return {"error": error.reason}
    return {"shape": list(image.shape[1:])}


def _pixels(result: dict) -> int:
    return result["shape"][0] * result["shape"][1]


def scan_folder(root: str | os.PathLike, *, strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> FolderScan:
    """Find and check the images of an ImageFolder-layout directory ``root/<class>/<image>``.

    Classes are the sorted subfolder names. Hidden files and folders are ignored, files without an image
    extension are listed in the report as non-image, unreadable images and those of more than ``max_pixels``
    pixels are skipped and listed with the reason, class folders left without images are dropped. Symbolic
    links are followed, except links to folders scanned already, which are listed; a file reached by a second
    path is taken once, by its first path in sorted order, and the other paths listed. ``strict`` turns any
    unreadable image into a :class:`DataError`. Raises :class:`DataError` when ``root`` is missing, a folder
    in it cannot be read, or fewer than 2 classes remain.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: give a folder of class subfolders "
                        f"(root/<class>/<image>), or one of the sources 'digits', 'cifar10', 'cifar100'")
    report = ScanReport(folders=[str(root)])
    walk = _Walk()
    walk.enter(root)  # so that a link back to the root (cat/loop -> ..) is a loop
    class_dirs = [root / e.name for e in _entries(root) if _is_dir(e)]
    stats: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
    files_by_class: dict[str, list[str]] = {}
    first_path: dict[str, str] = {}  # real path of each image taken -> the path it was taken by
    for class_dir, files in zip(class_dirs, walk.files(class_dirs)):
        files_by_class[class_dir.name] = []
        for path, real in files:
            if not is_image_file(path.name):
                report.non_image.append(str(path))
                continue
            if real in first_path:
                report.duplicates.append((str(path), first_path[real]))
                continue
            first_path[real] = str(path)
            rel = path.relative_to(root).as_posix()
            try:
                st = path.stat()
            except OSError as error:  # e.g. a broken symbolic link
                report.skipped.append((str(path), f"{type(error).__name__}: {error}"))
                continue
            stats[rel] = (st.st_size, st.st_mtime_ns)
            files_by_class[class_dir.name].append(rel)
    report.links_skipped = walk.links_skipped

    cache_path = _cache_file(root)
    cached = _load_cache(cache_path, root)
    results = {rel: cached[rel] for rel, (size, mtime) in stats.items()
               if rel in cached and (cached[rel]["size"], cached[rel]["mtime_ns"]) == (size, mtime)
               and not (cached[rel].get("unchecked") and _pixels(cached[rel]) <= max_pixels)}
    todo = [rel for rel in stats if rel not in results]
    if todo:
        # Threads, not processes: decoding releases the GIL, and on 2 cores a thread pool checked ~2 MP JPEGs
        # as fast as a process pool (~5 ms each) without the start-up cost. A cheaper partial decode (PIL draft
        # mode, ~25% faster) could disagree with the decoder used in training, so the scan uses that decoder.
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            checked = tqdm(pool.map(_check, [root / rel for rel in todo], [max_pixels] * len(todo)),
                           total=len(todo), desc=f"checking images in {root.name}", unit="img", disable=None,
                           leave=False)
            for rel, result in zip(todo, checked):
                results[rel] = {"size": stats[rel][0], "mtime_ns": stats[rel][1], **result}
    report.decoded = len(todo)
    if results != cached:
        _save_cache(cache_path, root, results)

    classes, samples, largest_side = [], [], 0
    for name, rels in files_by_class.items():
        readable = []
        for rel in rels:
            result = results[rel]
            if "error" in result:
                report.skipped.append((str(root / rel), result["error"]))
            elif _pixels(result) > max_pixels:  # the limit applies to the cached size too: no decoding needed
                height, width = result["shape"]
                report.skipped.append((str(root / rel), ImageTooLarge(root / rel, width, height, max_pixels).reason))
            else:
                readable.append(rel)
                largest_side = max(largest_side, *result["shape"])
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
