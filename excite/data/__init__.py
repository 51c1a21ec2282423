"""The data layer: image folders (scanned, checked, split), digits and CIFAR, transforms and loaders.

:func:`build_data` is the entry point; :func:`make_loader` gives loaders whose batches depend only on
(seed, epoch).
"""
from excite.data.build import DataBundle, build_data, cifar_test_set
from excite.data.folder import FolderScan, ScanReport, cache_dir, scan_folder, stratified_split
from excite.data.images import IMAGE_EXTENSIONS, ImageFileDataset, UnreadableImage, decode_image
from excite.data.loader import EpochSampler, Loader, make_loader
from excite.data.sources import digits_folder
from excite.data.transforms import AUGMENTATIONS, PRESETS, batch_mixer, build_transform

__all__ = [
    "AUGMENTATIONS", "IMAGE_EXTENSIONS", "PRESETS", "DataBundle", "EpochSampler", "FolderScan", "ImageFileDataset",
    "Loader", "ScanReport", "UnreadableImage", "batch_mixer", "build_data", "build_transform", "cache_dir",
    "cifar_test_set", "decode_image", "digits_folder", "make_loader", "scan_folder", "stratified_split",
]
