"""Atomic writes, checkpoints (round trip, hostile and broken files) and safetensors weights."""
import errno
import multiprocessing
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from excite.errors import CheckpointError
from excite.io import LockHeld, atomic_write, atomic_write_json, atomic_write_text, exclusive_lock
from excite.models import create_model
from excite.train.checkpoint import (
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    model_from_checkpoint,
    read_weights,
    restore_rng_state,
    save_checkpoint,
    save_weights,
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
        "config": {"lr": 0.01, "epochs": 10}, "epoch": 2, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
        "rng": capture_rng_state(), "metrics": [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}],
        "best_acc": 0.75,
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
    state["img_size"] = 8
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
    for name, message in [("foreign", "no excite metadata"), ("broken", "not a complete .safetensors"),
                          ("missing", "does not exist")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / f"{name}.safetensors")
