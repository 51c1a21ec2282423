"""The pieces fit() is built from, each on its own: the run directory, loader choice, how failures end a run, and
where a resumed epoch's counts start in each process."""
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch

from excite.errors import ExciteError, NonFiniteLossError, RunInterrupted
from excite.train.config import TrainConfig
from excite.train.distributed import Processes
from excite.train.failures import StopRequest, training_failures
from excite.train.loaders import use_image_cache
from excite.train.run import Run
from excite.train.run_directory import RunDirectory


def test_only_the_writing_process_creates_or_writes_the_run_directory(tmp_path):
    for writer in (False, True):
        path = tmp_path / f"writer-{writer}"
        with ExitStack() as held:
            directory = RunDirectory(path, resume=False, writer=writer, held=held)
            directory.create()
            directory.write_config(TrainConfig(), TrainConfig(epochs=3))
            directory.write_model({"params": 1})
            directory.add_session(torch.device("cpu"), Processes(rank=0 if writer else 1, world_size=2))
            directory.write_skipped([("a.png", "truncated")], {}, {})
        written = sorted(p.name for p in path.iterdir()) if path.exists() else []
        # The lock file goes with the lock, when the run ends.
        expected = ["config.json", "environment.json", "model.json", "skipped_files.txt"]
        assert written == (expected if writer else [])


def test_an_open_run_directory_is_locked_against_a_second_run(tmp_path):
    config = TrainConfig(out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    with ExitStack() as held:
        directory, resolved, checkpoint = RunDirectory.open(config, False, Processes(), held)
        assert directory.locked and checkpoint is None and resolved.run_id
        with ExitStack() as other, pytest.raises(ExciteError, match="in use by another excite process"):
            RunDirectory.open(config, False, Processes(), other)
    with ExitStack() as held:  # released when the first run's stack closed
        RunDirectory.open(config, False, Processes(), held)


@pytest.mark.parametrize("overrides, size, expected", [
    ({}, 32, True), ({}, 224, False), ({"augment": "randaugment"}, 32, False), ({"cache_images": False}, 32, False),
    ({"cache_images": True}, 224, True), ({"crop_pct": 0.875}, 32, False)])
def test_the_image_cache_is_chosen_for_small_images_without_per_image_augmentation(overrides, size, expected):
    data = SimpleNamespace(train=[0] * 100, val=[0] * 20, img_size=size, preset="cifar" if size <= 64 else "imagenet")
    assert use_image_cache(TrainConfig(**overrides), data) is expected


def test_per_image_augmentation_on_the_image_cache_is_refused():
    data = SimpleNamespace(train=[0], val=[0], img_size=32, preset="cifar")
    with pytest.raises(ExciteError, match="cannot run on the image cache"):
        use_image_cache(TrainConfig(cache_images=True, augment="trivialaugment"), data)


def fake_run(tmp_path, saved_at=None):
    return SimpleNamespace(run_dir=tmp_path, saved_at=saved_at, epoch=2, stop=StopRequest(),
                           config=TrainConfig(model="resnet18"), data=SimpleNamespace(batch_size=64, img_size=224))


def test_failures_end_a_run_with_what_was_saved_and_how_to_go_on(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no epoch had completed"):
        with training_failures(fake_run(tmp_path)):
            raise NonFiniteLossError("the training loss became nan")
    with pytest.raises(RunInterrupted, match="before the first checkpoint; nothing to resume"):
        with training_failures(fake_run(tmp_path)):
            raise KeyboardInterrupt
    (tmp_path / "last.pt").write_bytes(b"saved")
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint is .*last.pt \(epoch 1\)"):
        with training_failures(fake_run(tmp_path, saved_at="epoch 1")):
            raise NonFiniteLossError("the training loss became nan")
    with pytest.raises(RunInterrupted, match="excite train --resume"):
        with training_failures(fake_run(tmp_path)):
            raise KeyboardInterrupt
    with pytest.raises(ExciteError, match="out of GPU memory at --batch-size 64 with resnet18 at 224px; try "
                                          "--batch-size 32 or --amp bf16"):
        with training_failures(fake_run(tmp_path)):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_resumed_epoch_counts_from_the_checkpoint_in_process_0_only():
    partial = {"progress": {"step": 3, "seen": 24, "loss_sum": 20.0, "correct": 9, "seconds": 1.5}}
    for rank, expected in ((0, (24, 20.0, 9)), (1, (0, 0.0, 0))):
        run = SimpleNamespace(processes=Processes(rank=rank, world_size=2))
        progress = Run.resumed_progress(run, partial)
        assert (progress.step, progress.seconds) == (3, 1.5)
        assert (progress.seen, progress.loss_sum, progress.correct) == expected
