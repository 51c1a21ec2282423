"""Tests of excite.data against data that misleads: split folders, partial batches, symbolic link loops, caches
that cannot be written, unreadable folders, decompression bombs, a validation folder that is the training
folder, file names that break line formats, and a split that must survive files coming and going."""
import errno
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import excite.data.folder as folder_module
import excite.data.gpu_cache as gpu_cache
from excite.data import (
    DEFAULT_MAX_PIXELS,
    ImageTooLarge,
    build_data,
    decode_image,
    format_skipped_lines,
    make_loader,
    parse_skipped_lines,
    resolve_layout,
    scan_folder,
)
from excite.data.folder import list_files
from excite.data.gpu_cache import CachedLoader, TensorCache, cached_loaders, tensor_cache
from excite.errors import DataError
from excite.inference import evaluate_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit, resume_config

# A run of about a second: a tiny ResNet-20 on 8-pixel images.
TINY = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, epochs=1, batch_size=4, img_size=8, lr=0.05)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCITE_CACHE_DIR", str(tmp_path / "cache"))


def _write_folder(root: Path, counts: dict[str, int], side: int = 8, seed: int = 0) -> list[Path]:
    """``root/<class>/<nnn>.png``, ``counts[class]`` random ``side``-pixel images each."""
    paths = []
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.random.default_rng([seed, c, i]).integers(0, 256, (side, side, 3), dtype=np.uint8)
            paths.append(root / name / f"{i:03d}.png")
            Image.fromarray(pixels).save(paths[-1])
    return paths


def _names(samples) -> list[str]:
    return [Path(path).parent.name + "/" + Path(path).name for path, _ in samples]


# ------------------------------------------------------------------------------ train/ + val/ folders

def test_a_folder_of_train_and_test_folders_trains_on_train_and_validates_on_test(tmp_path):
    _write_folder(tmp_path / "split" / "train", {"cat": 6, "dog": 6})
    _write_folder(tmp_path / "split" / "test", {"cat": 2, "dog": 2}, seed=1)
    bundle = build_data(tmp_path / "split", img_size=8, batch_size=4)
    assert bundle.classes == ["cat", "dog"]
    assert {Path(p).parents[1].name for p, _ in bundle.train.samples} == {"train"} and len(bundle.train) == 12
    assert {Path(p).parents[1].name for p, _ in bundle.val.samples} == {"test"} and len(bundle.val) == 4
    assert bundle.notes[0] == (f"{tmp_path / 'split'} is split into test/, train/: training on train/, validating on "
                               "test/ (--data-layout classes would make them classes)")
    assert bundle.split["train"][0] == "train/cat/000.png" and bundle.split["val"][0] == "test/cat/000.png"
    assert bundle.report.images == 16 and len(bundle.report.folders) == 2

    as_classes = build_data(tmp_path / "split", img_size=8, batch_size=4, data_layout="classes")
    assert as_classes.classes == ["test", "train"] and not any("split into" in note for note in as_classes.notes)


def test_split_folder_names_are_case_insensitive_and_val_comes_before_test(tmp_path):
    for name, seed in (("Train", 0), ("VAL", 1), ("test", 2)):
        _write_folder(tmp_path / "split" / name, {"cat": 3, "dog": 3}, seed=seed)
    train, val, note = resolve_layout(tmp_path / "split")
    assert (train.name, val.name) == ("Train", "VAL")
    assert note.endswith("training on Train/, validating on VAL/, not using test/ "
                         "(--data-layout classes would make them classes)")
    assert resolve_layout(tmp_path / "split", "classes") == ((tmp_path / "split").resolve(), None, None)
    # Classes that happen to be called train and test, holding images rather than class folders, stay classes.
    _write_folder(tmp_path / "vehicles", {"train": 2, "test": 2})
    assert resolve_layout(tmp_path / "vehicles")[1] is None


def test_split_folders_must_hold_the_same_classes_and_nothing_else(tmp_path):
    _write_folder(tmp_path / "split" / "train", {"cat": 3, "dog": 3})
    _write_folder(tmp_path / "split" / "val", {"cat": 2, "fox": 2})
    with pytest.raises(DataError, match=r"classes of val/ of .* differ .*only in training: \['dog'\], only in "
                                        r"validation: \['fox'\]"):
        build_data(tmp_path / "split", img_size=8, batch_size=2)
    _write_folder(tmp_path / "split" / "val", {"dog": 2})
    _write_folder(tmp_path / "split" / "notes", {"misc": 1})
    with pytest.raises(DataError, match=r"and other folders too \(notes\).*--data-layout classes"):
        build_data(tmp_path / "split", img_size=8, batch_size=2)


def test_an_explicit_val_dir_beside_a_split_folder_wins(tmp_path):
    _write_folder(tmp_path / "split" / "train", {"cat": 4, "dog": 4})
    _write_folder(tmp_path / "split" / "val", {"cat": 2, "dog": 2}, seed=1)
    _write_folder(tmp_path / "other", {"cat": 3, "dog": 3}, seed=2)
    bundle = build_data(tmp_path / "split", img_size=8, batch_size=2, val_dir=tmp_path / "other")
    assert (len(bundle.train), len(bundle.val)) == (8, 6)
    assert {Path(p).parents[1].name for p, _ in bundle.val.samples} == {"other"}
    assert "validating on --val-dir" in bundle.notes[0] and "val/ is not used" in bundle.notes[0]
    assert bundle.split["val"][0] == "<val-dir>/cat/000.png" and bundle.split["train"][0] == "train/cat/000.png"


def test_train_and_eval_of_a_split_folder_use_its_parts(tmp_path):
    _write_folder(tmp_path / "split" / "train", {"cat": 6, "dog": 6})
    _write_folder(tmp_path / "split" / "test", {"cat": 3, "dog": 2}, seed=1)
    lines = []
    fit(TrainConfig(**TINY, data=str(tmp_path / "split"), out=str(tmp_path / "run")), log=lines.append)
    assert any("training on train/, validating on test/" in line for line in lines), lines
    for split in ("all", "val"):  # a 2-class "train vs test" scan would not even have the run's classes
        result = evaluate_checkpoint(tmp_path / "run" / "last.pt", str(tmp_path / "split"), split=split,
                                     out=str(tmp_path / f"eval-{split}"), device="cpu", log=lambda _: None)
        assert result["images"] == 5, split


# --------------------------------------------------------------------------------------- partial batches

def test_training_keeps_the_partial_last_batch_unless_it_holds_one_image():
    def epoch(size, batch_size, start_batch=0):
        loader = make_loader([(torch.tensor(i), i) for i in range(size)], batch_size, train=True, seed=1)
        loader.set_epoch(3, start_batch)
        return [labels.tolist() for _, labels in loader]

    batches = epoch(10, 4)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert epoch(10, 4, start_batch=1) == batches[1:]  # a resumed epoch goes on exactly
    assert [len(b) for b in epoch(9, 4)] == [4, 4]  # a last batch of one image would break batch norm
    assert [len(b) for b in epoch(9, 1)] == [1] * 9


def test_the_image_cache_keeps_the_partial_last_batch_too(tmp_path):
    _write_folder(tmp_path / "data", {"a": 6, "b": 6})
    for batch_size, sizes in ((4, [4, 4, 2]), (3, [3, 3, 3])):  # 10 training images
        bundle = build_data(tmp_path / "data", img_size=8, batch_size=batch_size)
        train, _ = cached_loaders(bundle, bundle.batch_size, device="cpu")
        train.set_epoch(2)
        batches = [labels for _, labels in train]
        assert [len(b) for b in batches] == sizes
        train.set_epoch(2, start_batch=1)
        assert all(torch.equal(a, b) for a, b in zip(batches[1:], [labels for _, labels in train], strict=True))
    data = TensorCache(torch.zeros(9, 3, 4, 4, dtype=torch.uint8), torch.arange(9))
    assert len(CachedLoader(data, 4, train=True, drop_last=True)) == 2


def test_batch_size_is_cut_to_the_training_set_and_a_lone_last_image_is_said(tmp_path):
    _write_folder(tmp_path / "data", {"a": 5, "b": 6})  # 4 + 5 = 9 training images
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=20)
    assert bundle.batch_size == 9
    assert bundle.notes == ["Batch size 20 is larger than the 9 training images: training in batches of 9"]
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=4)
    assert bundle.batch_size == 4 and bundle.notes == [
        "The last batch of 1 image is left out of each epoch (9 training images in batches of 4): batch norm cannot "
        "train on one image; it is another image each epoch"]
    assert not build_data(tmp_path / "data", img_size=8, batch_size=3).notes


def test_fit_trains_with_a_batch_larger_than_the_data_and_says_so(tmp_path):
    _write_folder(tmp_path / "data", {"a": 5, "b": 5})
    lines = []
    result = fit(TrainConfig(**{**TINY, "batch_size": 64}, data=str(tmp_path / "data"), out=str(tmp_path / "run")),
                 log=lines.append)
    assert "Batch size 64 is larger than the 8 training images: training in batches of 8" in lines
    assert len(result.history) == 1


# ---------------------------------------------------------------------------------------- symbolic links

def test_a_link_loop_in_a_class_folder_adds_nothing(tmp_path):
    _write_folder(tmp_path / "data", {"cat": 12, "dog": 12})
    (tmp_path / "data" / "cat" / "loop").symlink_to("..")
    (tmp_path / "data" / "dog" / "cats").symlink_to("../cat")
    scan = scan_folder(tmp_path / "data")
    assert scan.report.images == len(scan.samples) == 24
    assert all(scan.classes[label] == Path(path).parent.name for path, label in scan.samples)
    assert scan.report.links_skipped == [str(tmp_path / "data" / "cat" / "loop"),
                                         str(tmp_path / "data" / "dog" / "cats")]
    assert scan.report.summary() == "24 images, 2 symbolic links to folders already scanned were skipped"
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=4)
    assert not {path for path, _ in bundle.train.samples} & {path for path, _ in bundle.val.samples}
    # Seen from cat/, the loop leads out of it to dog/, which is listed; cat/ itself is not listed again.
    assert len(list_files(tmp_path / "data" / "cat")) == 24


def test_linked_folders_outside_are_followed_and_a_file_reached_twice_is_taken_once(tmp_path):
    _write_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    _write_folder(tmp_path / "more", {"cats": 2})
    (tmp_path / "data" / "cat" / "more").symlink_to(tmp_path / "more" / "cats")
    (tmp_path / "data" / "cat" / "again").symlink_to(tmp_path / "more" / "cats")  # the same folder once more
    (tmp_path / "data" / "dog" / "x.png").symlink_to(tmp_path / "data" / "cat" / "000.png")
    scan = scan_folder(tmp_path / "data")
    cat = tmp_path / "data" / "cat"
    assert sorted(path for path, label in scan.samples if label == 0) == sorted(
        [str(cat / f"00{i}.png") for i in range(3)] + [str(cat / "again" / f"00{i}.png") for i in range(2)])
    assert scan.report.links_skipped == [str(cat / "more")]
    assert scan.report.duplicates == [(str(tmp_path / "data" / "dog" / "x.png"), str(cat / "000.png"))]
    assert scan.report.images == 8 and "1 more paths to images already found left out" in scan.report.summary()


# ----------------------------------------------------------------------------- caches that cannot be written

def _cache_under_a_file(tmp_path, monkeypatch) -> Path:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EXCITE_CACHE_DIR", str(blocker / "cache"))  # mkdir fails there, even for root
    return blocker


def test_a_scan_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data", {"a": 3, "b": 3})
    blocker = _cache_under_a_file(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match=f"cannot write the scan cache into {blocker}.*going on without it"):
        assert build_data(tmp_path / "data", img_size=8, batch_size=2).report.images == 6
    monkeypatch.setenv("EXCITE_CACHE_DIR", str(tmp_path / "cache"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder_module, "atomic_write_text", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        assert scan_folder(tmp_path / "data").report.images == 6


def test_an_image_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data", {"a": 3, "b": 3})
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=2)
    blocker = _cache_under_a_file(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match=f"cannot write the image cache into {blocker}"):
        assert len(tensor_cache(bundle.train, 8)) == len(bundle.train)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpu_cache, "atomic_write", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        TensorCache.from_files([p for p, _ in bundle.train.samples], bundle.train.targets, size=8,
                               cache_dir=tmp_path / "tensors")


def test_digits_that_cannot_be_written_are_one_line(tmp_path, monkeypatch):
    blocker = _cache_under_a_file(tmp_path, monkeypatch)
    with pytest.raises(DataError, match=f"cannot write the digits into {blocker}.*EXCITE_CACHE_DIR"):
        build_data("digits", batch_size=4)


# ---------------------------------------------------------------------------------- unreadable folders

def test_a_class_folder_that_cannot_be_read_is_an_error_not_a_missing_class(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data", {"a": 2, "b": 2, "c": 2})
    locked = tmp_path / "data" / "b"
    scandir = os.scandir

    def refuse_b(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_b)  # as chmod 000 would, which root ignores
    with pytest.raises(DataError, match=f"cannot read folder {locked} \\(Permission denied\\): fix its permissions"):
        scan_folder(tmp_path / "data")


# ------------------------------------------------------------------------------------ decompression bombs

def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` zeros: tiny on disk, ``3 * width * height`` bytes decoded."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    rows = zlib.compress(bytes((1 + (width + 7) // 8) * height), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_from_its_header(tmp_path):
    _write_folder(tmp_path / "data", {"a": 2, "b": 2})
    # 14,000 x 14,000 is above twice PIL's own limit, where PIL would refuse even to read the header.
    bomb = _huge_png(tmp_path / "data" / "a" / "bomb.png", 14_000, 14_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        scan = scan_folder(tmp_path / "data")
    reason = f"image of 14000 x 14000 = 196000000 pixels is above the limit of {DEFAULT_MAX_PIXELS} (--max-pixels)"
    assert scan.report.skipped == [(str(bomb), reason)] and scan.report.images == 4
    with pytest.raises(DataError, match="1 unreadable image"):
        scan_folder(tmp_path / "data", strict=True)
    with pytest.raises(ImageTooLarge, match="image of 8 x 8 = 64 pixels is above the limit of 63 "):
        decode_image(tmp_path / "data" / "a" / "000.png", max_pixels=63)
    assert decode_image(tmp_path / "data" / "a" / "000.png", max_pixels=64).shape == (3, 8, 8)


def test_the_pixel_limit_applies_to_cached_scans_without_decoding_again(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data", {"a": 5, "b": 5})
    _write_folder(tmp_path / "data", {"a": 1}, side=16, seed=1)  # a/000.png: 256 pixels
    big = str(tmp_path / "data" / "a" / "000.png")
    assert [p for p, _ in scan_folder(tmp_path / "data", max_pixels=100).report.skipped] == [big]
    full = scan_folder(tmp_path / "data", max_pixels=1000)  # a larger limit decodes only the image left out
    assert full.report.decoded == 1 and full.report.images == 10 and full.largest_side == 16

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_module, "decode_image", no_decoding)
    again = scan_folder(tmp_path / "data", max_pixels=100)
    assert again.report.decoded == 0 and [p for p, _ in again.report.skipped] == [big]
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=2, max_pixels=100)
    assert big not in {p for p, _ in bundle.train.samples + bundle.val.samples}
    assert bundle.train.max_pixels == bundle.val.max_pixels == 100


# ------------------------------------------------------------------------------------ --val-dir apart

@pytest.mark.parametrize("val_dir", ["data", "data/a", "."])
def test_a_val_dir_that_is_in_or_around_the_training_folder_is_refused(val_dir, tmp_path):
    _write_folder(tmp_path / "data", {"a": 3, "b": 3})
    relation = {"data": "is", "data/a": "is inside", ".": "holds"}[val_dir]
    with pytest.raises(DataError, match=f"--val-dir .* {relation} the training folder .*validation would see"):
        build_data(tmp_path / "data", img_size=8, batch_size=2, val_dir=tmp_path / val_dir)


# -------------------------------------------------------------------------------------- skipped_files.txt

def test_skipped_lines_read_back_exactly_whatever_the_names():
    entries = {"/d/a: b.png": "OSError: x: y", "/d/new\nline.png": "tab\there", "/d/back\\slash\\n.png": "\r\n",
               "/d/plain.png": ""}
    text = format_skipped_lines(entries.items())
    assert text.count("\n") == len(entries) and parse_skipped_lines(text) == entries
    with pytest.raises(ValueError):
        parse_skipped_lines("a line without its tab\n")


def test_an_unreadable_file_with_a_newline_in_its_name_is_listed_once_over_resumes(tmp_path):
    data = tmp_path / "data"
    _write_folder(data, {"a": 5, "b": 5})
    odd = data / "a" / "bad\nname: really.png"
    odd.write_bytes(b"not a png")
    run = tmp_path / "run"
    fit(TrainConfig(**TINY, data=str(data), out=str(run)), log=lambda _: None)
    fit(resume_config(run, epochs=2), resume=True, log=lambda _: None)
    text = (run / "skipped_files.txt").read_text(encoding="utf-8")
    assert text.count("\n") == 1
    entries = parse_skipped_lines(text)
    assert list(entries) == [str(odd)] and entries[str(odd)] == scan_folder(data).report.skipped[0][1]

    (run / "skipped_files.txt").write_bytes(b"\xff\xfe damaged\n")
    with pytest.warns(UserWarning, match="skipped_files.txt cannot be read back"):
        fit(resume_config(run, epochs=3), resume=True, log=lambda _: None)
    assert list(parse_skipped_lines((run / "skipped_files.txt").read_text(encoding="utf-8"))) == [str(odd)]


# -------------------------------------------------------------------------------------- recorded split

def test_a_recorded_split_keeps_every_image_on_its_side(tmp_path):
    paths = _write_folder(tmp_path / "data", {"a": 20, "b": 20, "c": 20})
    first = build_data(tmp_path / "data", img_size=8, batch_size=4)
    assert len(first.split["val"]) == 12 and not first.notes
    same = build_data(tmp_path / "data", img_size=8, batch_size=4, recorded_split=first.split)
    assert same.split == first.split and not same.notes  # nothing changed, nothing said
    removed = first.train.samples[0][0]
    os.remove(removed)

    # Split afresh, one image fewer reshuffles its class: former training images are now validating.
    fresh = build_data(tmp_path / "data", img_size=8, batch_size=4)
    assert set(fresh.split["val"]) & set(first.split["train"])

    kept = build_data(tmp_path / "data", img_size=8, batch_size=4, recorded_split=first.split)
    removed_key = Path(removed).relative_to((tmp_path / "data").resolve()).as_posix()
    assert kept.split == {"train": [k for k in first.split["train"] if k != removed_key], "val": first.split["val"]}
    assert [p for p, _ in kept.val.samples] == [p for p, _ in first.val.samples]
    assert kept.notes == ["The split recorded in the run is kept: 1 of its training images and 0 of its validation "
                          "images are gone; 0 new images are left out"]

    Image.open(paths[1]).save(tmp_path / "data" / "b" / "new.png")
    again = build_data(tmp_path / "data", img_size=8, batch_size=4, recorded_split=kept.split)
    assert again.split == kept.split
    assert again.notes == ["The split recorded in the run is kept: 0 of its training images and 0 of its validation "
                           "images are gone; 1 new image is left out"]


def test_a_recorded_split_of_a_val_dir_and_its_refusals(tmp_path):
    _write_folder(tmp_path / "train", {"a": 3, "b": 3})
    val_paths = _write_folder(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    first = build_data(tmp_path / "train", img_size=8, batch_size=2, val_dir=tmp_path / "val")
    os.remove(val_paths[0])
    kept = build_data(tmp_path / "train", img_size=8, batch_size=2, val_dir=tmp_path / "val",
                      recorded_split=first.split)
    assert kept.split == {"train": first.split["train"], "val": first.split["val"][1:]}
    assert "0 of its training images and 1 of its validation images are gone" in kept.notes[0]
    for path in val_paths[1:]:
        os.remove(path)
    with pytest.raises(DataError, match="none of the 4 validation images of the split recorded in the run are left"):
        build_data(tmp_path / "train", img_size=8, batch_size=2, recorded_split=first.split)
    with pytest.raises(DataError, match="the recorded split must be"):
        build_data(tmp_path / "train", img_size=8, batch_size=2, recorded_split={"train": []})
