"""Data-parallel training on the CPU: two processes with gloo, started by torchrun as a user starts them.

Each torchrun start costs a few seconds of process start-up, so these are marked slow. The in-process tests at
the top check the pieces (how batches are shared, agreement) without starting anything.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from excite.cli import main
from excite.data import make_loader
from excite.data.loader import drops_last_batch, shard
from excite.train.checkpoint import load_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
# 36 images: 30 train (batches of 8: 8 + 8 + 8 + 6, shared 4 + 4 and 3 + 3), 6 validation (3 + 3).
TINY = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, epochs=3, batch_size=8, img_size=16,
            lr=0.05, seed=5, val_split=0.2, workers=0)

# Runs `excite train ARGS` under torchrun and, in each process, saves the weights it ends with to
# $CAPTURE_DIR/rank<N>.pt; with $KILL_AT_STEP, process 0 SIGKILLs itself at that optimizer step instead.
DRIVER = r"""
import atexit, importlib, os, signal, sys
import torch
from excite.cli import main

fit_module = importlib.import_module("excite.train.fit")  # the module; excite.train.fit is also the function
rank, kill_at = int(os.environ.get("RANK", "0")), int(os.environ.get("KILL_AT_STEP", "0"))
wrap = fit_module.for_training

def capture(model, place, *args, **kwargs):
    atexit.register(lambda: torch.save(model.state_dict(), os.path.join(os.environ["CAPTURE_DIR"], f"rank{rank}.pt")))
    return wrap(model, place, *args, **kwargs)

fit_module.for_training = capture
if kill_at and rank == 0:
    steps, sgd_step = [0], torch.optim.SGD.step
    def step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return sgd_step(self, *args, **kwargs)
    torch.optim.SGD.step = step
sys.exit(main(sys.argv[1:]))
"""

# One training step of a BatchNorm model on a fixed batch of 7 images (shared 4 + 3 between two processes), by
# excite's own loader, loop and DDP wrapping; process 0 saves the weights and statistics after it to $OUT.
ONE_STEP = r"""
import os, sys
import torch
from torch.utils.data import TensorDataset
from excite.data import make_loader
from excite.models import create_model
from excite.train.distributed import for_training, processes
from excite.train.loop import Precision, train_one_epoch

sync_bn = sys.argv[1] == "sync"
torch.manual_seed(0)
images, labels = torch.randn(7, 3, 16, 16), torch.randint(0, 3, (7,))
model = create_model("resnet20_cifar", num_classes=3, widths=[4, 8, 8])
device = torch.device("cpu")


def one_step(place):  # a function, so that the DDP wrapper is gone before the process group is
    loader = make_loader(TensorDataset(images, labels), 7, train=True, seed=1, rank=place.rank,
                         world_size=place.world_size)
    loader.set_epoch(1)
    trained = for_training(model, place, device, sync_bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(trained, loader, optimizer, scheduler, Precision(device), epoch=1, processes=place)


with processes(device) as place:
    one_step(place)
    if place.is_main:
        torch.save(model.state_dict(), os.environ["OUT"])
"""


def env(**extra: str) -> dict[str, str]:
    # One thread per process: two processes share the CPU's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def train_args(data: Path, out: Path, nproc: int | None = None, **overrides) -> list[str]:
    """``excite train`` arguments for TINY with ``overrides``, through a config file written beside ``out``."""
    config = out.parent / f"{out.name}-config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({**TINY, "data": str(data), **overrides}))
    launch = ["--nproc", str(nproc)] if nproc is not None else []
    return ["train", "--config", str(config), "--out", str(out), *launch]


def torchrun(script: Path, args: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, str(script), *args], env=env(**extra_env), capture_output=True, text=True,
                          timeout=600, check=False)


def assert_close_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    far = [k for k in a if a[k].is_floating_point() and not torch.allclose(a[k], b[k], atol=atol, rtol=atol)]
    same_ints = all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    assert not far and same_ints, f"{len(far)} tensors differ, first {far[:1]}"


# ------------------------------------------------------------------------------------------- in process

def test_shards_cover_a_batch_once_in_order_with_sizes_one_apart():
    for size in range(0, 12):
        for world in (1, 2, 3, 4):
            parts = [shard(10, 10 + size, rank, world) for rank in range(world)]
            assert [i for begin, end in parts for i in range(begin, end)] == list(range(10, 10 + size))
            sizes = [end - begin for begin, end in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_two_processes_load_the_batches_of_one_process_between_them():
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(23.0)[:, None], torch.zeros(23, dtype=torch.long))

    def batches(rank, world):
        loader = make_loader(data, 6, train=True, seed=4, rank=rank, world_size=world)
        loader.set_epoch(3)
        return [images[:, 0].tolist() for images, _ in loader]

    whole, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(whole) == len(first) == len(second) == 4  # the last batch of 5 is kept: 3 + 2 images
    assert [a + b for a, b in zip(first, second)] == whole
    assert drops_last_batch(23, 6, world_size=3)  # 5 left over cannot give three processes two images each


# ------------------------------------------------------------------------------------------- torchrun

@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def ddp_run(folder, driver, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted two-process run, and the folder holding each process's final weights."""
    root = tmp_path_factory.mktemp("ddp")
    done = torchrun(driver, train_args(folder, root / "run"), CAPTURE_DIR=str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", root


@pytest.mark.slow
def test_two_processes_end_with_the_same_weights_and_validate_as_eval_does(ddp_run, folder, tmp_path, capsys):
    run, captured = ddp_run
    rank0, rank1 = torch.load(captured / "rank0.pt"), torch.load(captured / "rank1.pt")
    assert_close_weights(rank0, rank1)  # exactly equal: DDP keeps the processes in step
    assert_close_weights(load_checkpoint(run / "last.pt")["model"], rank0)
    sessions = json.loads((run / "environment.json").read_text())
    assert len(sessions) == 1 and sessions[0]["processes"] == 2  # one process wrote it, once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]

    # The validation the two processes shared equals a one-process evaluation of the saved weights.
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(folder), "--split", "val",
                 "--out", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["images"] == 6
    assert evaluated["top1"] == pytest.approx(rows[-1]["val_acc"], abs=1e-9)
    assert evaluated["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_with_sync_bn_two_processes_step_as_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    results = {}
    for mode in ("sync", "plain"):
        done = torchrun(script, [mode], OUT=str(tmp_path / f"two-{mode}.pt"))
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = torch.load(tmp_path / f"two-{mode}.pt")
    single = subprocess.run([sys.executable, str(script), "sync"], env=env(OUT=str(tmp_path / "one.pt")),
                            capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt")
    assert_close_weights(results["sync"], one, atol=1e-5)
    # Without SyncBatchNorm each process normalises by its own 4 or 3 images: the step differs, which is what
    # makes the equality above mean something.
    with pytest.raises(AssertionError):
        assert_close_weights(results["plain"], one, atol=1e-5)


@pytest.mark.slow
def test_a_two_process_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(ddp_run, folder, driver, tmp_path):
    reference, _ = ddp_run
    run = tmp_path / "run"
    # Step 6 is epoch 2, step 2; a checkpoint after every step leaves last.pt at step 1 of epoch 2.
    killed = torchrun(driver, train_args(folder, run, checkpoint_minutes=0), CAPTURE_DIR=str(tmp_path),
                      KILL_AT_STEP="6")
    assert killed.returncode != 0
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["progress"]["step"] == 1

    resumed = torchrun(driver, ["train", "--resume", str(run)], CAPTURE_DIR=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close_weights(load_checkpoint(run / "last.pt")["model"], load_checkpoint(reference / "last.pt")["model"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m[k] for m in metrics for k in ("train_loss", "val_acc")] == pytest.approx(
        [m[k] for m in expected for k in ("train_loss", "val_acc")], rel=1e-6)


@pytest.mark.slow
def test_checkpoints_move_between_one_and_two_processes(folder, tmp_path):
    # With SyncBatchNorm two processes compute what one does, so a run that changes its number of processes at each
    # resume ends where a one-process run does (up to float rounding). A constant rate: a schedule would stretch with
    # each --epochs.
    config = TrainConfig(**{**TINY, "data": str(folder), "sync_bn": True, "sched": "constant"})
    reference = fit(config.__class__(**{**config.to_dict(), "out": str(tmp_path / "reference")}), log=lambda _: None)

    run = tmp_path / "run"
    assert main(train_args(folder, run, sync_bn=True, sched="constant", epochs=1)) == 0
    two = subprocess.run([sys.executable, "-m", "excite", "train", "--nproc", "2", "--resume", str(run),
                          "--epochs", "2"], env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((run / "environment.json").read_text())[1]["processes"] == 2
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert_close_weights(load_checkpoint(run / "last.pt")["model"],
                         load_checkpoint(reference.run_dir / "last.pt")["model"], atol=1e-4)


def test_nproc_and_batch_size_errors_are_one_line(folder, tmp_path, capsys, monkeypatch):
    assert main(train_args(folder, tmp_path / "a", nproc=0)) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(train_args(folder, tmp_path / "b", nproc=2)) == 2
    assert "already runs under torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_an_error_under_nproc_is_one_line_said_once(folder, tmp_path):
    # A learning rate this large makes the loss NaN in the first steps, in both processes at the same step.
    failed = subprocess.run([sys.executable, "-m", "excite", *train_args(folder, tmp_path / "run", nproc=2, lr=1e30)],
                            env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("excite: error: the training loss became nan"), failed.stderr
