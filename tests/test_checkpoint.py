"""Atomic writes, checkpoints (round trip, hostile and broken files) and safetensors weights."""
import errno
import json
import multiprocessing
import os
import pickle
import random
import re
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from excite.errors import CheckpointError
from excite.io import LockHeld, atomic_write, atomic_write_json, atomic_write_text, exclusive_lock
from excite.models import create_model, load_weights
from excite.models.weights import read_state_dict
from excite.train.checkpoint import (
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    model_from_checkpoint,
    read_weights,
    restore_rng_state,
    restore_state,
    save_checkpoint,
    save_weights,
    validate_checkpoint,
)

TINY = dict(layers=(1, 1, 1), widths=(4, 8, 8), num_classes=3)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20_cifar", **TINY)


def trained_state(model: torch.nn.Module) -> dict:
    """Take two optimizer and scheduler steps so that their states hold something, and build the trainer's layout."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    for _ in range(2):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
    return {
        "model_name": model.model_name, "model_kwargs": model.model_kwargs, "classes": ["cat", "dog", "fox"],
        "img_size": 8, "preset": "cifar",
        "config": {"lr": 0.01, "epochs": 10}, "epoch": 2, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
        "rng": capture_rng_state(), "metrics": [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}],
        "best_acc": 0.75, "best_epoch": 2, "partial": None,
    }, optimizer


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as f:
            f.write(b"new but unfinished")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]  # the temporary file is gone


def test_atomic_write_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "één\nline\n")
    assert (tmp_path / "a.txt").read_bytes() == "één\nline\n".encode()
    atomic_write_json(tmp_path / "a.json", {"b": [1, 2.5, None]})
    assert (tmp_path / "a.json").read_text() == '{\n  "b": [\n    1,\n    2.5,\n    null\n  ]\n}\n'
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "c", "a"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.txt"]


def test_exclusive_lock_refuses_a_second_holder_with_the_first_ones_pid(tmp_path, monkeypatch):
    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        # flock locks belong to the open file, so a second open file in the same process is refused too.
        with pytest.raises(LockHeld) as held, exclusive_lock(lock):
            pytest.fail("two holders at once")
        assert held.value.pid == os.getpid()
    assert not lock.exists()  # released and removed
    with exclusive_lock(lock):
        pass

    monkeypatch.setattr("excite.io.fcntl", None)  # as on Windows: nothing is locked, nothing is written
    with exclusive_lock(tmp_path / "other.lock"), exclusive_lock(tmp_path / "other.lock"):
        pass
    assert not (tmp_path / "other.lock").exists()


def _signal_then_sleep(started) -> None:
    started.set()
    time.sleep(30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # Data loader workers are forked from the training process: they must not hold its run directory's
    # lock after the process lets it go, or outlive it with the lock when it is killed.
    lock = tmp_path / ".lock"
    context = multiprocessing.get_context("fork")
    started = context.Event()
    with exclusive_lock(lock):
        child = context.Process(target=_signal_then_sleep, args=(started,))
        child.start()
    assert started.wait(30)  # the child runs (and has closed what it inherited)
    try:
        with exclusive_lock(lock):
            assert lock.read_text() == f"{os.getpid()}\n"
    finally:
        child.kill()
        child.join()


def test_a_file_system_that_cannot_lock_is_used_unlocked_with_a_warning(tmp_path, monkeypatch):
    import excite.io

    class NoLocks:  # fcntl as on a network file system without lock support
        LOCK_EX = LOCK_NB = 0

        @staticmethod
        def flock(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(excite.io, "fcntl", NoLocks)
    with pytest.warns(UserWarning, match="cannot be locked \\(No locks available\\)"), \
            exclusive_lock(tmp_path / ".lock"):
        entered = True
    assert entered
    NoLocks.flock = staticmethod(lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"), exclusive_lock(tmp_path / ".lock"):
        pytest.fail("entered without the lock after an I/O error")


def test_checkpoint_round_trip_resumes_model_optimizer_scheduler_and_rng(tmp_path):
    model = tiny_model()
    state, optimizer = trained_state(model)
    save_checkpoint(tmp_path / "last.pt", state)
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])

    ckpt = load_checkpoint(tmp_path)  # a run directory means its last.pt
    assert (ckpt["format"], ckpt["version"], ckpt["epoch"], ckpt["best_acc"]) == ("excite-checkpoint", 1, 2, 0.75)
    assert ckpt["config"] == state["config"] and ckpt["metrics"] == state["metrics"]
    restore_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]

    restored, classes = model_from_checkpoint(ckpt)
    assert classes == ["cat", "dog", "fox"] and not restored.training
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    assert torch.equal(restored(x), model(x))

    # The restored optimizer and scheduler take the same next step as the originals.
    restored.train()
    model.train()
    optimizer2 = torch.optim.AdamW(restored.parameters(), lr=0.01)
    scheduler2 = torch.optim.lr_scheduler.OneCycleLR(optimizer2, max_lr=0.01, total_steps=10)
    optimizer2.load_state_dict(ckpt["optimizer"])
    scheduler2.load_state_dict(ckpt["scheduler"])
    assert scheduler2.get_last_lr() == state["scheduler"]["_last_lr"]
    for m, opt in ((model, optimizer), (restored, optimizer2)):
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_save_checkpoint_refuses_values_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"state\['config'\]\['lr'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "last.pt", {"config": {"lr": np.float64(0.1)}})
    assert not (tmp_path / "last.pt").exists()


def _touch(path):
    Path(path).touch()


class TouchMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


class ShellMarker(TouchMarker):
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", [TouchMarker, ShellMarker])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"format": "excite-checkpoint", "version": 1, "model": payload(marker)}
    if writer == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    assert "\n" not in str(err.value)
    if writer == "torch":  # a bare pickle is refused before any unpickling, as not being a torch file
        assert str(err.value).startswith(f"refusing to load {path}: it contains pickled code (")
        assert "re-save the weights as .safetensors" in str(err.value)


def test_broken_or_foreign_checkpoints_raise_one_line_errors(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"model": tiny_model().state_dict()})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save(tiny_model().state_dict(), tmp_path / "plain_state_dict.pt")
    (tmp_path / "empty_run").mkdir()
    cases = {
        "truncated.pt": "truncated or corrupt",
        "empty.pt": "is empty",
        "text.pt": "not a PyTorch file",
        "plain_state_dict.pt": "not an excite checkpoint",
        "missing.pt": "does not exist",
        "empty_run": "last.pt does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)


def test_model_from_checkpoint_reports_unknown_model_and_shape_mismatch():
    state = tiny_model().state_dict()
    with pytest.raises(CheckpointError, match="unknown model 'resnet21_cifar'"):
        model_from_checkpoint({"model_name": "resnet21_cifar", "model_kwargs": {}, "classes": [], "model": state})
    with pytest.raises(CheckpointError, match=r"fc.weight: \(3, 8\) in the file, \(5, 8\) in the model"):
        model_from_checkpoint({"model_name": "resnet20_cifar", "model_kwargs": {**TINY, "num_classes": 5},
                               "classes": [], "model": state})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        model_from_checkpoint({"model_name": "resnet20_cifar", "model_kwargs": TINY, "classes": [],
                               "model": {**state, "extra.weight": torch.zeros(1)}})


def test_safetensors_weights_round_trip_with_metadata(tmp_path):
    model = tiny_model()
    state, _ = trained_state(model)
    save_weights(tmp_path / "best.safetensors", state)
    weights = read_weights(tmp_path / "best.safetensors")
    assert weights["model_name"] == "resnet20_cifar"
    assert weights["model_kwargs"] == {"layers": [1, 1, 1], "widths": [4, 8, 8], "num_classes": 3}
    assert (weights["classes"], weights["img_size"]) == (["cat", "dog", "fox"], 8)
    assert weights["model"].keys() == state["model"].keys()
    assert all(torch.equal(weights["model"][k], v) for k, v in state["model"].items())

    restored, classes = model_from_checkpoint(load_checkpoint(tmp_path / "best.safetensors"))
    x = torch.randn(2, 3, 8, 8)
    assert classes == ["cat", "dog", "fox"]
    assert torch.equal(restored(x), model.eval()(x))


def test_export_safetensors_handles_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(6.0).view(2, 3)
    export_safetensors({"a": base, "tied": base, "transposed": base.t()}, tmp_path / "w.safetensors", {"n": 1})
    loaded = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["tied"], base) and torch.equal(loaded["transposed"], base.t())


def test_read_weights_refuses_foreign_and_broken_files(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    for name, message in [("foreign", "no excite metadata"), ("broken", "not a valid safetensors file"),
                          ("missing", "does not exist")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / f"{name}.safetensors")


# ------------------------------------------------------------------------------------------- checksums

DAMAGED = "is damaged: its contents do not match the checksum stored when it was written"


def flip_bytes_in_torch_file(path: Path) -> None:
    """Invert 64 bytes in the middle of the largest tensor record of a torch.save zip (stored uncompressed), as
    a bad disk or copy would: the container still opens, and torch.load does not check the records' CRCs."""
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if re.search(r"/data/\d+$", info.filename)),
                     key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        start = record.header_offset + 30 + name_length + extra_length + record.file_size // 2 - 32
        f.seek(start)
        data = f.read(64)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def flip_bytes_in_safetensors(path: Path) -> None:
    """Invert 16 bytes in the middle of a .safetensors file's tensor data (after its JSON header)."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    middle = (data_start + len(raw)) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_flipped_bytes_is_refused_as_damaged(tmp_path):
    state, _ = trained_state(tiny_model())
    save_checkpoint(tmp_path / "best.pt", state)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2  # whole: loads, with no checksum entry left
    flip_bytes_in_torch_file(tmp_path / "best.pt")
    torch.load(tmp_path / "best.pt", weights_only=True)  # torch itself notices nothing
    for read in (load_checkpoint, read_state_dict, lambda path: load_weights(tiny_model(), path)):
        with pytest.raises(CheckpointError) as err:
            read(tmp_path / "best.pt")
        assert str(err.value).startswith(f"{tmp_path / 'best.pt'} {DAMAGED}") and "\n" not in str(err.value)


def test_a_weights_file_with_flipped_bytes_is_refused_as_damaged(tmp_path):
    state, _ = trained_state(tiny_model())
    save_weights(tmp_path / "best.safetensors", state)
    flip_bytes_in_safetensors(tmp_path / "best.safetensors")
    safetensors.torch.load_file(tmp_path / "best.safetensors")  # the file itself still reads
    for read in (load_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'best.safetensors'} {DAMAGED}")):
            read(tmp_path / "best.safetensors")


def test_a_changed_value_outside_the_tensors_is_damage_too(tmp_path):
    state, _ = trained_state(tiny_model())
    save_checkpoint(tmp_path / "last.pt", state)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 9}, tmp_path / "last.pt")  # the checksum of epoch 2 kept
    with pytest.raises(CheckpointError, match=DAMAGED):
        load_checkpoint(tmp_path / "last.pt")


def test_files_without_a_checksum_still_load(tmp_path):
    # What older excite versions wrote: the same layouts, no checksum.
    state, _ = trained_state(tiny_model())
    torch.save({**state, "format": "excite-checkpoint", "version": 1}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 2
    metadata = {key: json.dumps(state[key]) for key in ("model_name", "model_kwargs", "classes", "img_size", "preset")}
    safetensors.torch.save_file(state["model"], tmp_path / "old.safetensors", metadata=metadata)
    assert read_weights(tmp_path / "old.safetensors")["classes"] == ["cat", "dog", "fox"]


# ---------------------------------------------------------------------------------- checkpoint structure

BROKEN_ENTRIES = {
    # name: (change to the saved state, what the one-line error says)
    "img_size a string": (lambda s: s.update(img_size="224"), "its 'img_size' is '224' (str), where excite expects"),
    "img_size too small": (lambda s: s.update(img_size=2), "its 'img_size' is 2 (int)"),
    "no model_kwargs": (lambda s: s.pop("model_kwargs"), "has no 'model_kwargs' entry"),
    "no metrics": (lambda s: s.pop("metrics"), "has no 'metrics' entry"),
    "metrics without epochs": (lambda s: s.update(metrics=[{"val_acc": 0.5}]), "its 'metrics' is"),
    "unknown preset": (lambda s: s.update(preset="imagenet21k"), "where excite expects one of imagenet, cifar"),
    "classes a string": (lambda s: s.update(classes="cat"), "its 'classes' is 'cat' (str)"),
    "epoch a string": (lambda s: s.update(epoch="2"), "its 'epoch' is '2' (str)"),
    "best_acc missing": (lambda s: s.pop("best_acc"), "has no 'best_acc' entry"),
    "model not tensors": (lambda s: s.update(model={"fc.weight": [1.0, 2.0]}), "its 'model' is"),
    "optimizer not a dict": (lambda s: s.update(optimizer=None), "its 'optimizer' is None"),
    "partial without a step": (lambda s: s.update(partial={"epoch": 3}), "its 'partial' is"),
}


@pytest.mark.parametrize("name", BROKEN_ENTRIES)
def test_a_checkpoint_missing_or_mistyping_an_entry_is_one_line_naming_it(name, tmp_path):
    change, expected = BROKEN_ENTRIES[name]
    state, _ = trained_state(tiny_model())
    change(state)
    save_checkpoint(tmp_path / "last.pt", state)  # a fresh checksum: only the structure is wrong
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "last.pt")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "last.pt")) and expected in message and "\n" not in message, message


def test_weights_files_are_checked_as_well(tmp_path):
    state, _ = trained_state(tiny_model())
    export_safetensors(state["model"], tmp_path / "w.safetensors",
                       {"model_name": "resnet20_cifar", "model_kwargs": TINY, "classes": ["a", "b", "c"],
                        "img_size": "large", "preset": "cifar"})
    with pytest.raises(CheckpointError, match=r"w.safetensors is not a usable checkpoint: its 'img_size' is 'large'"):
        load_checkpoint(tmp_path / "w.safetensors")
    assert validate_checkpoint({**state, "format": "excite-checkpoint"}, "x.pt")["epoch"] == 2


def test_a_class_list_shorter_than_the_outputs_is_refused_before_predicting(tmp_path):
    state, _ = trained_state(tiny_model())
    state["classes"] = ["cat", "dog"]
    save_checkpoint(tmp_path / "best.pt", state)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'best.pt'} names 2 classes but its model has "
                                                        "3 outputs")):
        model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"), tmp_path / "best.pt")


def test_restore_state_turns_states_that_do_not_fit_into_one_line(tmp_path):
    model = tiny_model()
    state, optimizer = trained_state(model)
    restore_state(optimizer, state["optimizer"], "optimizer", "run/last.pt")  # one that fits
    two_groups = torch.optim.AdamW([{"params": [model.fc.weight]}, {"params": [model.fc.bias]}])
    with pytest.raises(CheckpointError, match=r"^the optimizer state in run/last.pt does not fit this run \(loaded "
                                              r"state dict has a different number of parameter groups\)"):
        restore_state(two_groups, state["optimizer"], "optimizer", "run/last.pt")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    with pytest.raises(CheckpointError, match="the scheduler state in run/last.pt does not fit"):
        restore_state(scheduler, [1, 2], "scheduler", "run/last.pt")
    five_classes = create_model("resnet20_cifar", **{**TINY, "num_classes": 5})
    with pytest.raises(CheckpointError, match=r"resuming from run/last.pt\): tensors 2 of another shape"):
        restore_state(five_classes, state["model"], "model", "run/last.pt")


def test_a_refused_write_says_how_to_resume_only_when_there_is_a_last_pt(tmp_path):
    from excite.errors import WriteRefused
    from excite.train.failures import resume_hint_on_refused_writes

    refused = WriteRefused(tmp_path / "metrics.csv", "No space left on device", errno.ENOSPC, existed=True)
    with pytest.raises(WriteRefused) as err, resume_hint_on_refused_writes(tmp_path):
        raise refused
    assert err.value is refused  # no last.pt: nothing to resume
    save_checkpoint(tmp_path / "last.pt", trained_state(tiny_model())[0])
    with pytest.raises(WriteRefused) as err, resume_hint_on_refused_writes(tmp_path):
        raise refused
    assert str(err.value) == (f"No space left on device: {tmp_path / 'metrics.csv'} could not be written; its "
                              f"previous version is intact; the run continues with `excite train --resume {tmp_path}` "
                              "once this is fixed")
