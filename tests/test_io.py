"""The files of a run directory: writes that never go through a link, never leave half a file or a user's file
deleted, a full disk as one line, the lock file, and damaged bookkeeping files on resume."""
import errno
import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

import excite.io
from excite.cli import main
from excite.errors import CheckpointError, WriteRefused
from excite.io import atomic_write, exclusive_lock, remove_leftover_temporaries
from excite.report.metrics import MetricsLogger
from excite.train.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit

TINY_RUN = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, epochs=1, batch_size=8, img_size=16,
                lr=0.05, seed=3)
DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def finished_run(folder, tmp_path_factory) -> Path:
    """A one-epoch run directory; copy it before changing anything in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return fit(TrainConfig(**TINY_RUN, data=str(folder), out=str(out)), log=lambda _: None).run_dir


def train_args(folder: Path, out: Path, epochs: int = 1) -> list[str]:
    return ["train", "--model", "resnet20_cifar", "--model-arg", "widths=[4,8,8]", "--data", str(folder), "--out",
            str(out), "--epochs", str(epochs), "--batch-size", "8", "--img-size", "16", "--lr", "0.05", "--seed", "3"]


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


# ------------------------------------------------------------------------------- links and other files

def test_a_symlinked_target_is_replaced_and_the_file_it_points_to_left_alone(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=...\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").symlink_to(victim)
    with atomic_write(tmp_path / "run" / "metrics.csv", "w") as f:
        f.write("epoch\n1\n")
    assert victim.read_text() == "export PATH=...\n"
    assert not (tmp_path / "run" / "metrics.csv").is_symlink()
    assert (tmp_path / "run" / "metrics.csv").read_text() == "epoch\n1\n"


def test_resuming_a_run_whose_files_are_links_leaves_the_linked_files_untouched(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    mine = tmp_path / "home"
    mine.mkdir()
    # last.pt links to a checkpoint of the user's own (resuming reads it), metrics.csv to any file of theirs.
    shutil.move(run / "last.pt", mine / "my-checkpoint.pt")
    (mine / "notes.txt").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    (run / "last.pt").symlink_to(mine / "my-checkpoint.pt")
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(mine / "notes.txt")

    status, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert status == 0, err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert not (run / "last.pt").is_symlink() and load_checkpoint(run / "last.pt")["epoch"] == 2
    assert not (run / "metrics.csv").is_symlink() and (run / "metrics.csv").read_text().startswith("epoch,")


def test_leftover_temporaries_are_removed_but_not_the_users_tmp_files(tmp_path):
    ours = [".last.pt.0123abcd.tmp", ".metrics.csv.ffffffff.tmp"]
    theirs = ["notes.tmp", ".notes.tmp", ".draft.tmp", ".last.pt.0123ABCD.tmp", ".last.pt.123abcd.tmp",
              ".x.0123abcde.tmp", "last.pt.0123abcd.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    remove_leftover_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)


# ------------------------------------------------------------------------------------------ the lock

def test_a_symlinked_lock_is_refused_and_the_file_it_points_to_kept(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    victim = tmp_path / "bashrc"
    victim.write_text("alias ll='ls -l'\n")
    (run / ".lock").unlink(missing_ok=True)  # excite versions that left it behind
    (run / ".lock").symlink_to(victim)
    status, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0] == (f"excite: error: {run / '.lock'} is a symbolic link, not the lock file excite creates, so "
                      "excite will not write to it; check what it points to, remove it, and run again")
    assert victim.read_text() == "alias ll='ls -l'\n"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # nothing trained


def test_a_lock_that_is_a_hard_link_or_a_pipe_is_refused(tmp_path):
    victim = tmp_path / "profile"
    victim.write_text("umask 022\n")
    os.link(victim, tmp_path / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock is a hard link to a file with 1 other name"), \
            exclusive_lock(tmp_path / ".lock"):
        pytest.fail("locked through a hard link")
    assert victim.read_text() == "umask 022\n"
    os.unlink(tmp_path / ".lock")
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock is not a plain file"), exclusive_lock(tmp_path / ".lock"):
        pytest.fail("locked a pipe")
    assert stat.S_ISFIFO(os.lstat(tmp_path / ".lock").st_mode)


def test_the_lock_file_is_removed_when_the_holder_lets_go_even_after_an_error(tmp_path):
    lock = tmp_path / ".lock"
    with pytest.raises(RuntimeError, match="training failed"), exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        raise RuntimeError("training failed")
    assert not lock.exists()
    lock.write_text("12345\n")  # left by a killed holder: taken over, then removed
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_a_lock_file_removed_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    # The race that removing the lock file opens: B opens the file, A (the holder) removes it and lets go,
    # B locks the removed file. B must notice and lock the file the path names, as a third process would.
    lock = tmp_path / ".lock"
    flock, calls = excite.io.fcntl.flock, []

    def the_holder_lets_go_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(lock)
            lock.write_text("")  # another process creates it anew
        return flock(fd, operation)

    monkeypatch.setattr(excite.io.fcntl, "flock", the_holder_lets_go_first)
    with exclusive_lock(lock):
        assert len(calls) == 2
        assert lock.read_text() == f"{os.getpid()}\n"  # written to the file the path names, not the removed one


# ------------------------------------------------------------------------------------------ full disk

def fill_the_disk_at(monkeypatch, name: str, nth: int = 1) -> None:
    """From the ``nth`` atomic write of ``name`` on, its temporary file is created but writing it fails with
    ENOSPC, as on a full disk (its descriptor is /dev/full's)."""
    real_open, calls = os.open, []

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if re.fullmatch(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.tmp", os.path.basename(path)):
            calls.append(path)
            if len(calls) >= nth:
                os.close(real_open(path, flags, mode))
                return real_open(DEV_FULL, os.O_WRONLY)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)


@needs_dev_full
@pytest.mark.parametrize("name", ["last.pt", "best.safetensors", "notes.txt"])
def test_a_full_disk_raises_write_refused_naming_the_file_and_keeps_the_old_one(name, tmp_path, monkeypatch):
    target = tmp_path / name
    target.write_bytes(b"the previous version")
    fill_the_disk_at(monkeypatch, name)
    tensors = {"w": torch.randn(64, 64)}  # more than a write buffer, so the failing write is inside the save
    with pytest.raises(WriteRefused) as refused:
        if name == "last.pt":  # torch.save reports the failed write as a RuntimeError
            save_checkpoint(target, {"model": tensors})
        elif name == "best.safetensors":
            export_safetensors(tensors, target, {"model_name": "x"})
        else:
            excite.io.atomic_write_text(target, "x" * 100_000)
    error = refused.value
    assert str(error) == f"No space left on device: {target} could not be written; its previous version is intact"
    assert (error.path, error.errno, error.reason) == (target, errno.ENOSPC, "No space left on device")
    assert isinstance(error, OSError) and error.__cause__ is not None
    assert target.read_bytes() == b"the previous version"
    assert os.listdir(tmp_path) == [name]  # no temporary file left


@needs_dev_full
def test_a_full_disk_during_training_is_one_line_and_the_last_checkpoint_stays(folder, tmp_path, monkeypatch,
                                                                              capsys):
    run = tmp_path / "run"
    fill_the_disk_at(monkeypatch, "last.pt", nth=2)  # epoch 1's last.pt is written, epoch 2's is not
    status, err = run_cli(train_args(folder, run, epochs=2), capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"excite: error: No space left on device: {run / 'last.pt'} could not be written; its "
                             "previous version is intact"), err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp")) and not (run / ".lock").exists()


@needs_dev_full
def test_a_full_disk_before_the_first_checkpoint_does_not_promise_a_resume(folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fill_the_disk_at(monkeypatch, "best.safetensors")  # the first checkpoint file epoch 1 writes
    status, err = run_cli(train_args(folder, run), capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"excite: error: No space left on device: {run / 'best.safetensors'} could not be "
                             "written; nothing was written to it"), err
    assert "--resume" not in err[0]
    assert not (run / "last.pt").exists() and not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------- damaged bookkeeping files

ROWS = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}]


@pytest.mark.parametrize("damage", ['{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_a', '[1, 2]\n',
                                    '{"val_acc": 0.5}\n', '\x00\x00\x00\x00\n', '{"epoch": "2"}\n'])
def test_a_damaged_metrics_jsonl_is_rebuilt_from_the_checkpoints_rows(damage, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(damage)
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'metrics.jsonl'} is damaged (line ")):
        logger = MetricsLogger(tmp_path, rows=ROWS)
    logger.append({"epoch": 3, "val_acc": 0.8})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == ROWS + [{"epoch": 3, "val_acc": 0.8}]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,val_acc"


def test_a_damaged_metrics_jsonl_read_by_epoch_keeps_its_readable_rows_with_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\nnot json\n{"epoch": 3}\n')
    with pytest.warns(UserWarning, match=r"metrics.jsonl is damaged \(line 2 is not JSON\); keeping the 2 rows"):
        logger = MetricsLogger(tmp_path, resume_epoch=2)
    assert logger.rows == [{"epoch": 1, "val_acc": 0.5}]


def test_an_intact_metrics_jsonl_is_rewritten_from_the_given_rows_without_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.75}\n'
                                            '{"epoch": 3, "val_acc": 0.8}\n')  # epoch 3 never reached last.pt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(tmp_path, rows=ROWS)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS
