"""Tests of excite.data: decoding a bad-file corpus, scanning and its cache, splitting, sources, loaders."""
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import excite.data.folder as folder_module
from excite.data import (
    UnreadableImage,
    batch_mixer,
    build_data,
    build_transform,
    cifar_test_set,
    decode_image,
    make_loader,
    scan_folder,
    stratified_split,
)
from excite.errors import DataError

H, W = 20, 30  # non-square, so a rotation shows in the decoded shape


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCITE_CACHE_DIR", str(tmp_path / "cache"))


def _rgb(seed=0, size=(H, W)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _write_corpus(root: Path) -> dict[str, set[str]]:
    """An image folder with every kind of file the scan must handle; returns the expected outcome per path."""
    rgb = Image.fromarray(_rgb())
    good, bad = root / "good", root / "bad"
    for name, image in {"rgb.jpg": rgb, "gray.png": rgb.convert("L"), "gray.jpg": rgb.convert("L"),
                        "rgba.png": rgb.convert("RGBA"), "cmyk.jpg": rgb.convert("CMYK"),
                        "palette.png": rgb.convert("P"), "palette.gif": rgb.convert("P"), "rgb.bmp": rgb,
                        "rgb.tif": rgb}.items():
        _save(good / name, image)
    _save(good / "rgb.webp", rgb, lossless=True)
    gray16 = (np.arange(H * W).reshape(H, W) * 100).astype(np.uint16)  # spans most of 0..65535
    _save(good / "gray16.png", Image.fromarray(gray16))
    _save(good / "gray16.tif", Image.fromarray(gray16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned 90 degrees
    _save(good / "exif_rotated.JPG", rgb, exif=exif)
    (bad / "sub").mkdir(parents=True)
    (bad / "zero_byte.jpg").touch()
    jpeg = (good / "rgb.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "sub" / "text.jpg").write_text("this is not an image")
    (bad / "notes.txt").write_text("not an image either")
    _save(bad / "kept.png", rgb)  # so that the class survives its bad files
    (root / "empty_class").mkdir()
    (root / ".git").mkdir()
    _save(root / ".git" / "hidden_class.png", rgb)
    (good / ".DS_Store").write_bytes(b"\0\1binary")
    (good / "._rgb.jpg").write_bytes(b"AppleDouble")
    hidden = {str(root / ".git" / "hidden_class.png"), str(good / ".DS_Store"), str(good / "._rgb.jpg")}
    return {
        "good": {str(p) for p in good.iterdir() if str(p) not in hidden} | {str(bad / "kept.png")},
        "unreadable": {str(bad / "zero_byte.jpg"), str(bad / "truncated.jpg"), str(bad / "sub" / "text.jpg")},
        "non_image": {str(bad / "notes.txt")},
        "empty": {str(root / "empty_class")},
        "hidden": hidden,
    }


def _write_folder(root: Path, counts: dict[str, int], side: int = 8) -> list[Path]:
    paths = []
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            paths.append(_save(root / name / f"{i:03d}.png", Image.fromarray(_rgb(100 * c + i, (side, side)))))
    return paths


def test_decode_corpus_every_image_is_upright_uint8_rgb(tmp_path):
    _write_corpus(tmp_path)
    good = tmp_path / "good"
    source = _rgb()
    for path in good.iterdir():
        if path.name.startswith("."):
            continue
        image = decode_image(path)
        expected_shape = (3, W, H) if "exif" in path.name else (3, H, W)
        assert image.dtype == torch.uint8 and tuple(image.shape) == expected_shape, path.name
    for name in ("rgb.bmp", "rgb.tif", "rgba.png", "rgb.webp"):  # lossless: exactly the source pixels
        assert np.array_equal(decode_image(good / name).permute(1, 2, 0).numpy(), source), name
    for name in ("gray.png", "gray16.png", "gray16.tif"):
        image = decode_image(good / name)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), name
    gray16 = (np.arange(H * W).reshape(H, W) * 100).astype(np.uint16)
    for name in ("gray16.png", "gray16.tif"):  # 16-bit values scaled to 8 bits, not clipped
        assert np.abs(decode_image(good / name)[0].numpy().astype(int) - gray16 / 257).max() <= 1, name
    for name in ("cmyk.jpg", "palette.gif", "exif_rotated.JPG"):  # as PIL sees it, upright
        with Image.open(good / name) as opened:
            expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB")).astype(int)
        assert np.abs(decode_image(good / name).permute(1, 2, 0).numpy() - expected).max() <= 1, name


def test_decode_unreadable_files_raise_with_reason(tmp_path):
    _write_corpus(tmp_path)
    for path in ("bad/zero_byte.jpg", "bad/truncated.jpg", "bad/sub/text.jpg", "bad/missing.png"):
        with pytest.raises(UnreadableImage) as caught:
            decode_image(tmp_path / path)
        assert caught.value.path == str(tmp_path / path) and caught.value.reason
    with pytest.raises(UnreadableImage, match="empty file"):
        decode_image(tmp_path / "bad/zero_byte.jpg")


def test_scan_handles_every_file_of_the_bad_corpus(tmp_path):
    expected = _write_corpus(tmp_path)
    scan = scan_folder(tmp_path)
    assert scan.classes == ["bad", "good"]
    assert {path for path, _ in scan.samples} == expected["good"]
    assert all(scan.classes[label] == Path(path).parent.name for path, label in scan.samples)
    assert {path for path, _ in scan.report.skipped} == expected["unreadable"]
    assert all(reason for _, reason in scan.report.skipped)
    assert set(scan.report.non_image) == expected["non_image"]
    assert set(scan.report.empty_classes) == expected["empty"]
    assert scan.report.images == len(expected["good"])
    listed = {p for p, _ in scan.samples} | {p for p, _ in scan.report.skipped} | set(scan.report.non_image)
    assert not listed & expected["hidden"]
    assert scan.largest_side == W
    assert scan.report.summary() == (f"{len(expected['good'])} images, 3 unreadable skipped, "
                                     "1 non-image files ignored, 1 empty class folders dropped")
    assert scan.report.format_skipped().count("\n") == 3


def test_scan_strict_names_count_and_first_file(tmp_path):
    _write_corpus(tmp_path)
    with pytest.raises(DataError, match=r"3 unreadable image\(s\) .*first: .*sub/text\.jpg"):
        scan_folder(tmp_path, strict=True)


def test_scan_cache_skips_unchanged_files_and_rescans_changed_ones(tmp_path, monkeypatch):
    root = tmp_path / "data"
    paths = _write_folder(root, {"a": 3, "b": 3})
    decoded = []

    def counting_decode(path, max_pixels):
        decoded.append(Path(path).name)
        return decode_image(path, max_pixels)

    monkeypatch.setattr(folder_module, "decode_image", counting_decode)
    assert scan_folder(root).report.decoded == 6 and len(decoded) == 6
    decoded.clear()
    assert scan_folder(root).report.decoded == 0 and decoded == []
    paths[0].write_bytes(b"corrupted")  # changed size: checked again, now unreadable
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, newer mtime
    _save(root / "b" / "new.png", Image.fromarray(_rgb(7, (8, 8))))
    scan = scan_folder(root)
    assert sorted(decoded) == sorted([paths[0].name, paths[1].name, "new.png"])
    assert [p for p, _ in scan.report.skipped] == [str(paths[0])] and scan.report.images == 6


def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="data folder .*nowhere does not exist"):
        scan_folder(tmp_path / "nowhere")
    _write_folder(tmp_path / "one", {"only": 2})
    with pytest.raises(DataError, match="need at least 2"):
        scan_folder(tmp_path / "one")


def test_stratified_split_is_seeded_stratified_and_order_independent():
    samples = [(f"c0/{i:02d}.png", 0) for i in range(10)] + [(f"c1/{i:02d}.png", 1) for i in range(25)]
    train, val = stratified_split(samples, 0.2, seed=0)
    assert sorted(train + val) == sorted(samples)
    assert [sum(label == c for _, label in val) for c in (0, 1)] == [2, 5]
    assert stratified_split(samples[::-1], 0.2, seed=0) == (train, val)
    assert stratified_split(samples, 0.2, seed=1)[1] != val
    with pytest.raises(DataError):
        stratified_split(samples, 1.0, seed=0)


def test_val_dir_classes_must_match(tmp_path):
    _write_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    _write_folder(tmp_path / "val", {"cat": 2, "dog": 2})
    _write_folder(tmp_path / "other", {"cat": 2, "fox": 2})
    bundle = build_data(tmp_path / "train", img_size=8, batch_size=2, val_dir=tmp_path / "val")
    assert (len(bundle.train), len(bundle.val), bundle.classes) == (8, 4, ["cat", "dog"])
    assert bundle.report.images == 12 and len(bundle.report.folders) == 2
    with pytest.raises(DataError, match=r"only in training: \['dog'\], only in validation: \['fox'\]"):
        build_data(tmp_path / "train", img_size=8, batch_size=2, val_dir=tmp_path / "other")


def test_build_data_presets_and_user_errors(tmp_path):
    _write_folder(tmp_path / "small", {"a": 5, "b": 5}, side=8)
    _write_folder(tmp_path / "large", {"a": 5, "b": 5}, side=80)
    small = build_data(tmp_path / "small", img_size=16, batch_size=4)
    assert small.preset == "cifar" and (len(small.train), len(small.val)) == (8, 2)
    image, label = small.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1)
    large = build_data(tmp_path / "large", batch_size=4)
    assert (large.preset, large.img_size, large.train[0][0].shape) == ("imagenet", 224, (3, 224, 224))
    assert build_data(tmp_path / "small", batch_size=4).img_size == 32
    with pytest.raises(DataError, match="does not exist"):
        build_data(tmp_path / "missing", img_size=16, batch_size=4)
    with pytest.raises(DataError, match="unknown augmentation"):
        build_data(tmp_path / "small", img_size=16, batch_size=4, augment="autoaugment")


def test_digits_are_written_once_and_load_as_a_folder(tmp_path, monkeypatch):
    bundle = build_data("digits", img_size=8, batch_size=16)
    assert bundle.classes == [str(d) for d in range(10)]
    assert len(bundle.train) + len(bundle.val) == bundle.report.images == 1797
    assert bundle.preset == "cifar"
    import sklearn.datasets

    def no_second_write():
        raise AssertionError("digits written twice")

    monkeypatch.setattr(sklearn.datasets, "load_digits", no_second_write)
    again = build_data("digits", img_size=8, batch_size=16)
    assert again.report.decoded == 0 and len(again.train) == len(bundle.train)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".digits-")]


def test_cifar_missing_offline_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cifar10 is not there and downloading is off") as caught:
        build_data("cifar10", img_size=32, batch_size=4, data_root=tmp_path, download=False)
    assert "\n" not in str(caught.value) and "cifar-10-python.tar.gz" in str(caught.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cifar100 could not be downloaded .*name resolution") as caught:
        build_data("cifar100", img_size=32, batch_size=4, data_root=str(tmp_path))
    assert "\n" not in str(caught.value)


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_batches_are_a_function_of_seed_and_epoch(tmp_path):
    _write_folder(tmp_path, {"a": 6, "b": 6})
    bundle = build_data(tmp_path, img_size=8, batch_size=4, augment="trivialaugment")
    rng_state = torch.get_rng_state()
    reference = _batches(make_loader(bundle.train, 4, train=True, workers=0, seed=3), epoch=2)
    assert torch.equal(torch.get_rng_state(), rng_state)  # loading leaves the caller's generator alone
    for workers in (0, 2):
        fresh = _batches(make_loader(bundle.train, 4, train=True, workers=workers, seed=3), epoch=2)
        assert [len(y) for _, y in fresh] == [len(y) for _, y in reference] == [4, 4, 2]  # 10 training images
        assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(fresh, reference))
    other_epoch = _batches(make_loader(bundle.train, 4, train=True, workers=0, seed=3), epoch=3)
    assert not torch.equal(other_epoch[0][0], reference[0][0])
    val_loader = make_loader(bundle.val, 4, train=False)
    val_labels = torch.cat([y for _, y in _batches(val_loader, epoch=5)])
    assert val_labels.tolist() == bundle.val.targets  # never shuffled, nothing dropped


@pytest.mark.parametrize("workers", [0, 2])
def test_files_broken_after_the_scan_are_skipped_and_counted(tmp_path, workers):
    paths = _write_folder(tmp_path / "data", {"a": 5, "b": 5})
    bundle = build_data(tmp_path / "data", img_size=8, batch_size=2)
    train_paths = [path for path, _ in bundle.train.samples]
    os.remove(train_paths[0])
    Path(train_paths[1]).write_bytes(b"\xff\xd8 no longer a JPEG")
    train_loader = make_loader(bundle.train, 2, train=True, workers=workers)
    val_loader = make_loader(bundle.val, 2, train=False, workers=workers)
    seen = sum(len(y) for _, y in train_loader) + sum(len(y) for _, y in val_loader)
    assert seen == len(paths) - 2
    assert set(train_loader.skipped) == set(train_paths[:2]) and train_loader.skipped_count() == 2
    assert not val_loader.skipped


def test_transforms_and_batch_mixer():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8)
    for preset in ("imagenet", "cifar"):
        for train in (False, True):
            out = build_transform(preset, 12, train=train, augment="randaugment" if train else None)(image)
            assert out.shape == (3, 12, 12) and out.dtype == torch.float32
    flips = {hflip: [torch.equal(build_transform("imagenet", 12, train=True, hflip=hflip)(image),
                                 build_transform("imagenet", 12, train=False)(image)) for _ in range(20)]
             for hflip in (True, False)}
    assert all(flips[False]) and not all(flips[True])
    assert batch_mixer(5, 0.0, 0.0) is None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((0.2, 0.0), (0.0, 1.0), (0.2, 1.0)):
        mixed, soft = batch_mixer(5, mixup, cutmix)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (4, 5)
        assert torch.allclose(soft.sum(1), torch.ones(4))


def test_cifar_local_copy_loads_with_the_cifar_preset(tmp_path, monkeypatch):
    import pickle

    from torchvision.datasets import CIFAR10

    batches = tmp_path / CIFAR10.base_folder
    batches.mkdir()
    for i, (name, _) in enumerate(CIFAR10.train_list + CIFAR10.test_list):
        rows = np.random.default_rng(i).integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)  # all images differ
        (batches / name).write_bytes(pickle.dumps({"data": rows, "labels": [0, 1]}))
    classes = [f"class{i}" for i in range(10)]
    (batches / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({CIFAR10.meta["key"]: classes}))
    # torchvision checks the files' MD5 sums, which our small stand-ins cannot match.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    bundle = build_data("cifar10", img_size=32, batch_size=4, data_root=tmp_path, download=False)
    # 5 training batches of labels [0, 1]: 20% of each class is held out for validation, stratified.
    assert (bundle.classes, bundle.preset, len(bundle.train), len(bundle.val)) == (classes, "cifar", 8, 2)
    assert sorted(bundle.val.targets) == [0, 1] and sorted(bundle.train.targets) == [0] * 4 + [1] * 4
    assert not {row.tobytes() for row in bundle.val.data} & {row.tobytes() for row in bundle.train.data}
    images, labels = next(iter(make_loader(bundle.train, 4, train=True)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    test = cifar_test_set("cifar10", img_size=32, data_root=tmp_path, download=False)
    assert len(test) == 2 and test[0][0].shape == (3, 32, 32)  # the test batch, apart from training
