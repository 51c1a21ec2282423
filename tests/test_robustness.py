"""Never lose a run: bad data, kills and Ctrl-C with exact resumes, non-finite losses, untrusted files and
user mistakes, each reported as one line.

Every run is a tiny ResNet-20 on a generated 16-pixel folder (30 training images, 4 steps an epoch), so a
whole run takes about a second; only the tests that kill or interrupt a real process start one.
"""
import errno
import importlib
import io
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from PIL import Image

from excite.cli import main
from excite.data import parse_skipped_lines
from excite.errors import ExciteError, NonFiniteLossError
from excite.io import exclusive_lock
from excite.train.checkpoint import load_checkpoint, model_from_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit, resume_config

# The module, for monkeypatching what fit() calls (excite.train re-exports the function under the same name).
fit_module = importlib.import_module("excite.train.fit")

# The same run as flags and as a config. 30 training images in batches of 8: 4 steps an epoch (8 + 8 + 8 + 6).
# Dropout and mixup draw from the global random generators, so an exact resume needs those restored too.
TINY = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8], "drop_rate": 0.1}, mixup=0.2, epochs=4,
            batch_size=8, img_size=16, lr=0.05, seed=3)
STEPS_PER_EPOCH = 4
# The only metrics that differ between equal runs: time, and the memory the process happened to hold.
TIMING_COLUMNS = ("epoch_seconds", "train_images_per_s", "peak_memory_mib")


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(data), "out": str(out), **overrides})


def train_args(data: Path, out: Path, **overrides) -> list[str]:
    """``excite train`` arguments for :func:`tiny_config` with the same values."""
    values = {**TINY, "data": data, "out": out, **overrides}
    args = ["train"]
    for key, value in values.items():
        if key == "model_kwargs":
            args += [arg for k, v in value.items() for arg in ("--model-arg", f"{k}={v}")]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``excite ARGV`` run in this process (argparse's exits count as statuses)."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, expected: str) -> str:
    lines = err.splitlines()
    assert status != 0 and len(lines) == 1, err
    assert lines[0].startswith("excite") and "error: " in lines[0] and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / name)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, first {unequal[0]}"


def metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same final and best weights, and the same metrics, as the uninterrupted reference run."""
    assert_same_weights(weights(run), weights(reference))
    assert_same_weights(weights(run, "best.safetensors"), weights(reference, "best.safetensors"))
    best = "best.safetensors"
    assert load_checkpoint(run / best)["epoch"] == load_checkpoint(reference / best)["epoch"]
    assert metric_rows(run) == metric_rows(reference)
    assert not list(run.glob(".*.tmp")), "a temporary file of an interrupted write was left behind"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_image_folder) -> Path:
    """A shared image folder that no test changes."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    """The run directory of the uninterrupted :data:`TINY` run on ``folder``."""
    return fit(tiny_config(folder, tmp_path_factory.mktemp("reference") / "run"), log=lambda _: None).run_dir


def subprocess_env() -> dict[str, str]:
    # Same thread count as this process, so that a killed subprocess computes what the in-process runs do.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


# ----------------------------------------------------------------------------------------------- bad data

def test_unreadable_files_are_skipped_reported_and_strict_refuses_them(image_folder, tmp_path, capsys):
    good_png = (image_folder / "red" / "000.png").read_bytes()
    jpeg = io.BytesIO()
    Image.open(image_folder / "red" / "000.png").save(jpeg, "JPEG")
    bad = {
        image_folder / "red" / "zero_byte.jpg": b"",
        image_folder / "green" / "truncated.png": good_png[: len(good_png) // 2],
        image_folder / "green" / "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        image_folder / "blue" / "text.jpg": b"this is not an image",
        image_folder / "blue" / "html.png": b"<html>404 not found</html>",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    run = tmp_path / "run"

    assert main(train_args(image_folder, run, epochs=1)) == 0
    assert f"Skipped {len(bad)} unreadable file(s); see {run / 'skipped_files.txt'}" in capsys.readouterr().out
    listed = parse_skipped_lines((run / "skipped_files.txt").read_text())
    assert set(listed) == {str(p) for p in bad}
    assert all(listed.values())  # each with its reason
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    status, err = run_cli(train_args(image_folder, tmp_path / "strict", epochs=1) + ["--strict"], capsys)
    line = assert_one_line_error(status, err, f"{len(bad)} unreadable image(s) in {image_folder}")
    assert "run without strict mode" in line
    assert not (tmp_path / "strict").exists()


def test_images_that_break_during_the_run_are_skipped_counted_and_listed(image_folder, tmp_path):
    broken = [image_folder / "red" / "003.png", image_folder / "green" / "007.png",
              image_folder / "blue" / "001.png", image_folder / "blue" / "010.png"]

    def break_files_after_epoch_1(line: str) -> None:
        lines.append(line)
        if line.startswith("Epoch: 1,"):
            broken[0].unlink()
            broken[1].write_text("overwritten with text")
            broken[2].write_bytes(b"")
            broken[3].write_bytes(broken[3].read_bytes()[:40])  # cut inside the PNG's first chunk

    lines: list[str] = []
    # Batch 6 divides the 30 training images, so every image is visited every epoch (none dropped).
    # cache_images=False: the image cache decodes everything up front; only the file loader reads during the run.
    config = tiny_config(image_folder, tmp_path / "run", epochs=3, batch_size=6, model="densenet_bc_100",
                         model_kwargs={"block_config": [2, 2, 2], "growth_rate": 4}, cache_images=False)
    result = fit(config, log=break_files_after_epoch_1)

    assert [row["skipped_in_run"] for row in result.history] == [0, 4, 4]
    assert [row["skipped_in_run"] for row in metric_rows(result.run_dir)] == [0, 4, 4]
    assert f"4 image(s) became unreadable during epoch 2 and were skipped; see " \
           f"{result.run_dir / 'skipped_files.txt'}" in lines
    listed = parse_skipped_lines((result.run_dir / "skipped_files.txt").read_text())
    assert sorted(listed) == sorted(map(str, broken))
    assert all(reason.endswith("(unreadable since the scan)") for reason in listed.values())
    assert load_checkpoint(result.run_dir / "last.pt")["epoch"] == 3


def skipped_lines(run: Path) -> dict[str, str]:
    """The reasons in ``run``'s skipped_files.txt by the path they name, checking that no path is listed twice."""
    text = (run / "skipped_files.txt").read_text()
    listed = parse_skipped_lines(text)
    assert len(listed) == text.count("\n"), text
    return listed


def test_files_skipped_in_an_earlier_session_stay_listed_after_resume(image_folder, tmp_path):
    run = tmp_path / "run"
    deleted, emptied, later = (image_folder / name for name in ("red/003.png", "green/007.png", "blue/001.png"))

    def break_two_files_after_epoch_1_then_stop(line: str) -> None:
        if line.startswith("Epoch: 1,"):
            deleted.unlink()  # the next session's scan will not see it at all
            emptied.write_bytes(b"")  # the next session's scan lists it as unreadable
        elif line.startswith("Epoch: 2,"):
            raise KeyboardInterrupt  # before epoch 2's checkpoint: the resume starts at epoch 2

    config = tiny_config(image_folder, run, epochs=3, batch_size=6, cache_images=False)  # see the test above
    with pytest.raises(ExciteError, match=f"excite train --resume {run}"):
        fit(config, log=break_two_files_after_epoch_1_then_stop)
    assert skipped_lines(run).keys() == {str(deleted), str(emptied)}

    def break_one_more_after_epoch_2(line: str) -> None:
        if line.startswith("Epoch: 2,"):
            later.write_text("overwritten with text")

    fit(resume_config(run), resume=True, log=break_one_more_after_epoch_2)
    listed = skipped_lines(run)
    assert listed.keys() == {str(deleted), str(emptied), str(later)}
    assert listed[str(deleted)].endswith("(unreadable since the scan)")  # as the first session recorded it
    assert not listed[str(emptied)].endswith("(unreadable since the scan)")  # now the scan's own entry
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


# ------------------------------------------------------------------------------------- kills and resumes

# Runs `excite train ARGS` and SIGKILLs itself at a chosen moment: at the NTH optimizer step ("mid-epoch"), or
# at the NTH replacement of last.pt, just before ("mid-write": the new checkpoint is complete in its temporary
# file but not yet renamed) or just after it ("after-write": before curves.png and the next epoch).
KILL_DRIVER = r"""
import os, signal, sys
import torch
from excite.cli import main

where, nth = sys.argv[1], int(sys.argv[2])
hits = 0

def hit():
    global hits
    hits += 1
    if hits == nth:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "mid-epoch":
    sgd_step = torch.optim.SGD.step
    def step(self, *args, **kwargs):
        hit()
        return sgd_step(self, *args, **kwargs)
    torch.optim.SGD.step = step
else:
    replace = os.replace
    def replace_and_maybe_die(src, dst):
        is_last = os.path.basename(dst) == "last.pt"
        if is_last and where == "mid-write":
            hit()
        replace(src, dst)
        if is_last and where == "after-write":
            hit()
    os.replace = replace_and_maybe_die
sys.exit(main(sys.argv[3:]))
"""


def signal_after_first_checkpoint(args: list[str], run: Path, signum: int) -> subprocess.CompletedProcess:
    """Start `excite train ARGS`, poll the run directory and send ``signum`` as soon as last.pt appears."""
    proc = subprocess.Popen([sys.executable, "-m", "excite.cli", *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists():
        assert proc.poll() is None, f"train ended before its first checkpoint: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)  # epochs take ~0.2 s, so the signal lands early in epoch 2
    assert proc.poll() is None, "the run finished before the signal could be sent"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.parametrize("where", ["external", "mid-epoch", "mid-write", "after-write"])
def test_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(where, folder, reference, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(folder, run)
    best_epoch = load_checkpoint(reference / "last.pt")["best_epoch"]
    # (n-th event to die at, the epoch last.pt must hold after the kill)
    nth, kept_epoch = {
        "mid-epoch": (STEPS_PER_EPOCH + 2, 1),  # epoch 2, step 2
        "mid-write": (2, 1),  # epoch 2 is computed (its best weights written if best) but its last.pt never lands
        "after-write": (best_epoch, best_epoch),  # the hardest for the best weights: right after the best epoch
    }.get(where, (None, None))

    if where == "external":
        killed = signal_after_first_checkpoint(args, run, signal.SIGKILL)
    else:
        killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, where, str(nth), *args], env=subprocess_env(),
                                capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = load_checkpoint(run / "last.pt")  # whole and loadable, whenever the kill came
    if kept_epoch is not None:
        assert saved["epoch"] == kept_epoch
    if where == "mid-write":
        assert len(list(run.glob(".last.pt.*.tmp"))) == 1  # the write that was cut short

    status, err = run_cli(["train", "--resume", str(run)], capsys)
    assert status == 0, err
    assert_same_run(run, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_a_readable_checkpoint_and_prints_the_resume_command(folder, tmp_path, capsys, signum):
    # SIGTERM is what job schedulers (and `kill`) send before they kill: it stops the run as Ctrl-C does.
    run = tmp_path / "run"
    # Many epochs, so that the run is still going when the signal comes; it is stopped after the first.
    interrupted = signal_after_first_checkpoint(train_args(folder, run, epochs=200), run, signum)

    line = assert_one_line_error(interrupted.returncode, interrupted.stderr,
                                 f"Continue with: excite train --resume {run}")
    assert interrupted.returncode == 128 + signum  # as shells report a process stopped by that signal
    assert line.startswith(f"excite: error: stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} ")
    assert f"saved in {run / 'last.pt'}" in line
    saved_epoch = load_checkpoint(run / "last.pt")["epoch"]
    assert saved_epoch >= 1
    assert not list(run.glob(".*.tmp"))

    # The printed command works (one more epoch, to keep the test short).
    status, err = run_cli(["train", "--resume", str(run), "--epochs", str(saved_epoch + 1)], capsys)
    assert status == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == saved_epoch + 1


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(folder, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "train_one_epoch", interrupted)
    status, err = run_cli(train_args(folder, tmp_path / "run"), capsys)
    assert_one_line_error(status, err, "interrupted during epoch 1, before the first checkpoint; nothing to resume")


class _Crash(BaseException):
    """Stands in for a kill: no except clause in fit() catches it, so nothing is saved on the way out."""


def _at_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` as the ``step``-th training batch (counted over the whole run) reaches the device."""
    calls = itertools.count(1)
    original = fit_module.Precision.to_device

    def to_device(self, images, targets):
        if torch.is_grad_enabled() and next(calls) == step:  # evaluation batches run under no_grad
            action()
        return original(self, images, targets)

    monkeypatch.setattr(fit_module.Precision, "to_device", to_device)


@pytest.mark.parametrize("cache_images", [False, True])
def test_ctrl_c_mid_epoch_saves_that_step_and_resumes_to_the_uninterrupted_result(
        cache_images, folder, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # Ctrl-C while the 2nd step of epoch 2 trains: that step finishes, is saved, and the run stops.
    _at_step(monkeypatch, STEPS_PER_EPOCH + 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    expected = f"stopped by Ctrl-C at epoch 2, step 2; saved in {run / 'last.pt'}"
    with pytest.raises(ExciteError, match=expected) as stopped:
        fit(tiny_config(folder, run, cache_images=cache_images), log=lambda _: None)
    assert stopped.value.exit_code == 130 and f"excite train --resume {run}" in str(stopped.value)
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["epoch"] == 2 and saved["partial"]["progress"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit() put Ctrl-C back

    monkeypatch.undo()
    lines = []
    fit(resume_config(run), resume=True, log=lines.append)
    assert any(line.startswith(f"Resuming {run} from epoch 2, step 2") for line in lines)
    if cache_images:  # the reference run, like every run on images this small, uses the image cache
        assert_same_run(run, reference)
    else:  # the file loader draws other crops than the cache: compare with its own uninterrupted run
        uninterrupted = fit(tiny_config(folder, tmp_path / "whole", cache_images=False), log=lambda _: None).run_dir
        assert_same_run(run, uninterrupted)


def test_resuming_mid_epoch_after_the_training_set_shrank_ends_that_epoch(folder, tmp_path, monkeypatch):
    data = shutil.copytree(folder, tmp_path / "images")
    run = tmp_path / "run"
    _at_step(monkeypatch, STEPS_PER_EPOCH + 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(ExciteError, match="stopped by Ctrl-C at epoch 2, step 2"):
        fit(tiny_config(data, run, cache_images=False), log=lambda _: None)
    monkeypatch.undo()
    for path in sorted(data.rglob("*.png"))[::3] + sorted(data.rglob("*.png"))[1::3]:
        path.unlink()  # 12 images left: 9 to train on, one batch of 8 (the 9th alone is left out), under 2 steps
    lines = []
    fit(resume_config(run), resume=True, log=lines.append)
    assert f"The training set has shrunk since {run / 'last.pt'} was saved at step 2 of epoch 2: that epoch " \
           "ends there" in lines
    assert [row["epoch"] for row in metric_rows(run)] == [1, 2, 3, 4]


def test_ctrl_c_at_the_last_step_of_an_epoch_resumes_without_a_shrinking_message(folder, reference, tmp_path,
                                                                                  monkeypatch):
    run = tmp_path / "run"
    _at_step(monkeypatch, 2 * STEPS_PER_EPOCH, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(ExciteError, match=f"stopped by Ctrl-C at epoch 2, step {STEPS_PER_EPOCH}"):
        fit(tiny_config(folder, run), log=lambda _: None)
    monkeypatch.undo()
    lines = []
    fit(resume_config(run), resume=True, log=lines.append)
    assert not any("shrunk" in line for line in lines), lines
    assert_same_run(run, reference)


def test_checkpoints_inside_the_epoch_survive_a_crash(folder, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # --checkpoint-minutes 0 checkpoints after every step; the crash lands as epoch 3's 2nd batch arrives.
    _at_step(monkeypatch, 2 * STEPS_PER_EPOCH + 2, lambda: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        fit(tiny_config(folder, run, checkpoint_minutes=0), log=lambda _: None)
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 2 and saved["partial"]["progress"]["step"] == 1
    monkeypatch.undo()
    fit(resume_config(run), resume=True, log=lambda _: None)
    assert_same_run(run, reference)


# ---------------------------------------------------------------------------- one process per run directory

# Holds the lock of a run directory (ARGV[1]: its lock file) as a training process does, until it is killed.
LOCK_HOLDER = r"""
import sys, time
from excite.io import exclusive_lock

with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_run_directory_in_use_is_refused_until_its_process_ends(folder, reference, tmp_path, capsys):
    run = shutil.copytree(reference, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run / fit_module.LOCK_FILE)],
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        in_use = (f"{run} is in use by another excite process (pid {holder.pid}); wait for it to finish or train "
                  "into another --out")
        status, err = run_cli(["train", "--resume", str(run), "--epochs", "5"], capsys)
        assert status == 2
        assert_one_line_error(status, err, in_use)
        with pytest.raises(ExciteError, match=re.escape(in_use)):  # a new run into the directory too
            fit(tiny_config(folder, run), log=lambda _: None)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        holder.kill()  # as kill -9 would: the holder has no chance to unlock
        holder.communicate()

    status, err = run_cli(["train", "--resume", str(run), "--epochs", "5"], capsys)
    assert status == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == 5


def test_a_run_keeps_its_directory_locked_until_it_ends(folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an existing directory is locked first, then cleaned of leftovers: the lock file must survive
    refusals = []

    def start_another_run_during_epoch_1(line: str) -> None:
        if line.startswith("Epoch: 1,"):
            try:
                fit(tiny_config(folder, run), log=lambda _: None)
            except ExciteError as e:
                refusals.append(str(e))

    fit(tiny_config(folder, run, epochs=2), log=start_another_run_during_epoch_1)
    in_use = f"{run} is in use by another excite process (pid {os.getpid()})"
    assert len(refusals) == 1 and refusals[0].startswith(in_use), refusals
    with exclusive_lock(run / fit_module.LOCK_FILE):  # released at the end
        pass


@pytest.mark.parametrize("other_run", ["running", "finished"])
def test_a_new_run_directory_taken_during_setup_is_refused(other_run, folder, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    build_data = fit_module.build_data
    with ExitStack() as other:
        def another_run_takes_the_directory(*args, **kwargs):
            if other_run == "running":
                run.mkdir()
                # A second open file of the lock: refused as another process's would be.
                other.enter_context(exclusive_lock(run / fit_module.LOCK_FILE))
            else:
                shutil.copytree(reference, run)
            return build_data(*args, **kwargs)

        monkeypatch.setattr(fit_module, "build_data", another_run_takes_the_directory)
        expected = (f"{run} is in use by another excite process (pid {os.getpid()})" if other_run == "running"
                    else f"{run} already holds a run")
        with pytest.raises(ExciteError, match=re.escape(expected)):
            fit(tiny_config(folder, run), log=lambda _: None)
        if other_run == "running":
            assert os.listdir(run) == [fit_module.LOCK_FILE]
        else:
            contents = [{p.name: p.read_bytes() for p in d.iterdir()} for d in (run, reference)]
            assert contents[0] == contents[1]


# ---------------------------------------------------------------------------------------- non-finite loss

def test_absurd_learning_rate_stops_in_the_first_epoch_with_one_line(folder, tmp_path, capsys):
    status, err = run_cli(train_args(folder, tmp_path / "run", lr=1e30), capsys)
    line = assert_one_line_error(status, err, "the training loss became")
    assert re.search(r"at epoch 1, step \d+;", line) and line.endswith("no epoch had completed")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(folder, reference, tmp_path, monkeypatch):
    build, models = fit_module.create_model, []

    def nan_at_epoch_2_step_2(name, **kwargs):
        model = build(name, **kwargs)
        forward, training_calls = model.forward, itertools.count(1)

        def poisoned(x):
            out = forward(x)
            return out * float("nan") if model.training and next(training_calls) == STEPS_PER_EPOCH + 2 else out

        model.forward = poisoned
        models.append(model)
        return model

    monkeypatch.setattr(fit_module, "create_model", nan_at_epoch_2_step_2)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        fit(tiny_config(folder, run), log=lambda _: None)
    message = str(error.value)
    assert "\n" not in message and "the training loss became nan at epoch 2, step 2;" in message
    assert message.endswith(f"the last good checkpoint is {run / 'last.pt'} (epoch 1)")
    # The NaN never reached the weights, and the checkpoint of epoch 1 is intact and usable.
    assert all(torch.isfinite(p).all() for p in models[0].parameters())
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 1 and [row["epoch"] for row in metric_rows(run)] == [1]
    model, _ = model_from_checkpoint(saved)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())

    monkeypatch.undo()  # the cause is gone: resuming finishes the run exactly as if nothing had happened
    fit(resume_config(run), resume=True, log=lambda _: None)
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------------------- untrusted files

class TouchOnUnpickle:
    """Unpickling this runs `touch MARKER`, as a malicious checkpoint would run anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_hostile(path: Path, marker: Path, writer: str) -> Path:
    state = {"format": "excite-checkpoint", "version": 1, "model": TouchOnUnpickle(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


def test_the_hostile_file_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(write_hostile(tmp_path / "hostile.pt", marker, "pickle").read_bytes())
    assert marker.exists()  # so the refusals below are refusals of a real attack


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("command", ["eval", "predict", "predict-run-dir", "resume"])
def test_untrusted_checkpoints_are_refused_without_running_them(command, writer, folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    image = folder / "red" / "000.png"
    name = {"predict-run-dir": "best.pt", "resume": "last.pt"}.get(command, "hostile.pt")
    hostile = write_hostile(tmp_path / "run" / name, marker, writer)
    argv = {
        "eval": ["eval", "--checkpoint", str(hostile), "--data", str(folder)],
        "predict": ["predict", "--checkpoint", str(hostile), str(image)],
        "predict-run-dir": ["predict", "--checkpoint", str(hostile.parent), str(image)],
        "resume": ["train", "--resume", str(hostile.parent)],
    }[command]
    status, err = run_cli(argv, capsys)
    # torch.save's zip names the code it refuses; a bare pickle is not even read as a torch file.
    code = f"{os.system.__module__}.system"
    expected = f"refusing to load {hostile}: it contains pickled code ({code})" if writer == "torch" else str(hostile)
    assert_one_line_error(status, err, expected)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ user mistakes

def _other_classes(folder, reference, tmp, make_image_folder) -> list[str]:
    other = make_image_folder(tmp / "pets", colours={"cat": (90, 90, 90), "dog": (160, 120, 60)})
    return ["eval", "--checkpoint", str(reference), "--data", str(other), "--out", str(tmp / "eval")]


def _corrupt_resume(folder, reference, tmp, make_image_folder) -> list[str]:
    shutil.copytree(reference, tmp / "run")
    data = (tmp / "run" / "last.pt").read_bytes()
    (tmp / "run" / "last.pt").write_bytes(data[: len(data) // 2])
    return ["train", "--resume", str(tmp / "run")]


def _corrupt_eval(folder, reference, tmp, make_image_folder) -> list[str]:
    (tmp / "garbage.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip signature, then noise
    return ["eval", "--checkpoint", str(tmp / "garbage.pt"), "--data", str(folder)]


def _resume_without_checkpoint(folder, reference, tmp, make_image_folder) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{}")  # a run killed before its first checkpoint
    return ["train", "--resume", str(tmp / "run")]


USER_ERRORS = {
    # name: (arguments, given the shared folder, the reference run, a temporary folder; expected message part)
    "missing data": (lambda f, r, t, m: train_args(t / "no-such-folder", t / "run"), "no-such-folder does not exist"),
    "unknown model": (lambda f, r, t, m: train_args(f, t / "run", model="resnet20_cifr"),
                      "unknown model 'resnet20_cifr': did you mean resnet20_cifar"),
    "negative epochs": (lambda f, r, t, m: train_args(f, t / "run", epochs=-1), "--epochs must be at least 1"),
    "image too small for model": (lambda f, r, t, m: ["train", "--model", "densenet121", "--img-size", "8",
                                                      "--data", str(f), "--out", str(t / "run"), "--batch-size", "8"],
                                  "model densenet121 cannot take 8x8 images"),
    "unknown model argument": (lambda f, r, t, m: train_args(f, t / "run") + ["--model-arg", "depth_multiplier=2"],
                               "cannot build resnet20_cifar with --model-arg values"),
    "classes differ": (_other_classes, "the checkpoint was trained on classes [blue, green, red] (3) but"),
    "resume without checkpoint": (_resume_without_checkpoint, "has no last.pt to resume from"),
    "corrupt checkpoint (resume)": (_corrupt_resume, "the file is truncated or corrupt"),
    "corrupt checkpoint (eval)": (_corrupt_eval, "the file is truncated or corrupt"),
    "changed option on resume": (lambda f, r, t, m: ["train", "--resume", str(r), "--lr", "0.1"],
                                 "--lr cannot change when resuming"),
    "eval batch size": (lambda f, r, t, m: ["eval", "--checkpoint", str(r), "--data", str(f), "--batch-size", "0"],
                        "--batch-size must be at least 1"),
    "summary image too small": (lambda f, r, t, m: ["summary", "densenet121", "--img-size", "8"],
                                "densenet121 cannot take 8x8 images"),
}
BAD_FLAGS = {
    "not a number": (["train", "--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    "not a choice": (["train", "--opt", "lbfgs"], "argument --opt: invalid choice: 'lbfgs'"),
    "not key=value": (["train", "--model-arg", "widths"], "expected KEY=VALUE"),
    "unknown flag": (["models", "--colour"], "unrecognized arguments: --colour"),
}


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = torch.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 2:  # a checkpoint after epoch 1: half written
            f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device", str(run / "last.pt"))
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    status, err = run_cli(train_args(folder, run), capsys)
    line = assert_one_line_error(status, err, f"No space left on device: {run}")
    assert "intact" in line and "--resume" in line
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the epoch before the disk filled
    assert not list(run.glob(".*.tmp"))
    with pytest.raises(OSError, match="No space left"):  # --debug lets the traceback through
        main(["--debug", *train_args(folder, tmp_path / "again")])


@pytest.mark.parametrize("name", USER_ERRORS)
def test_user_mistakes_are_one_line_without_traceback_unless_debug(name, folder, reference, tmp_path,
                                                                   make_image_folder, capsys):
    make_argv, expected = USER_ERRORS[name]
    argv = make_argv(folder, reference, tmp_path, make_image_folder)
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert_one_line_error(status, err, expected)
    with pytest.raises(ExciteError, match=re.escape(expected)):  # --debug lets the traceback through
        main(["--debug", *argv])


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_flags_are_one_line_without_usage_dump(name, capsys):
    argv, expected = BAD_FLAGS[name]
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert_one_line_error(status, err, expected)


def test_gpu_out_of_memory_names_the_batch_size_and_suggests_a_smaller_one(folder, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fit_module, "train_one_epoch", out_of_memory)
    status, err = run_cli(train_args(folder, tmp_path / "run"), capsys)
    line = assert_one_line_error(status, err, "out of GPU memory at --batch-size 8 with resnet20_cifar at 16px")
    assert "try --batch-size 4" in line

    # Out of memory already for one image, while checking the input size: a smaller batch cannot help.
    build = fit_module.create_model

    def huge(name, **kwargs):
        model = build(name, **kwargs)
        model.forward = out_of_memory
        return model

    monkeypatch.setattr(fit_module, "create_model", huge)
    status, err = run_cli(train_args(folder, tmp_path / "run2"), capsys)
    assert_one_line_error(status, err, "out of memory running one 16x16 image through resnet20_cifar")


def test_an_existing_run_is_never_overwritten_without_resume(reference, folder, tmp_path, capsys):
    run = shutil.copytree(reference, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    with pytest.raises(ExciteError, match=f"{re.escape(str(run))} already holds a run; continue it with --resume"):
        fit(tiny_config(folder, run, lr=0.1), log=lambda _: None)
    status, err = run_cli(train_args(folder, run), capsys)
    assert_one_line_error(status, err, f"continue it with --resume {run} or choose another --out")

    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
