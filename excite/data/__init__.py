"""The data layer: image folders (scanned, checked, split), digits and CIFAR, transforms and loaders.

:func:`build_data` is the entry point; :func:`make_loader` gives loaders whose batches depend only on
(seed, epoch).
"""
from excite.data.build import DataBundle, build_data, cifar_test_set
from excite.data.folder import (
    FolderScan,
    ScanReport,
    cache_dir,
    format_skipped_lines,
    parse_skipped_lines,
    resolve_layout,
    scan_folder,
    stratified_split,
)
from excite.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    ImageTooLarge,
    UnreadableImage,
    decode_image,
)
from excite.data.loader import EpochSampler, Loader, drops_last_batch, make_loader
from excite.data.sources import digits_folder
from excite.data.transforms import AUGMENTATIONS, PRESETS, batch_mixer, build_transform

__all__ = [
    "AUGMENTATIONS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "PRESETS", "DataBundle", "EpochSampler", "FolderScan",
    "ImageFileDataset", "ImageTooLarge", "Loader", "ScanReport", "UnreadableImage", "batch_mixer", "build_data",
    "build_transform", "cache_dir", "cifar_test_set", "decode_image", "digits_folder", "drops_last_batch",
    "format_skipped_lines", "make_loader", "parse_skipped_lines", "resolve_layout", "scan_folder", "stratified_split",
]
