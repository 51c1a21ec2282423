"""What a run directory says about its run: the resolved configuration, its identity, its bookkeeping files,
and the lines a run prints before and while it trains."""
import json
import shutil

import pytest

import excite
import excite.inference
from excite.cli import main
from excite.errors import CheckpointError, ExciteError
from excite.train.checkpoint import load_checkpoint
from excite.train.fit import resume_config


def tiny_config(data, out, **overrides) -> excite.TrainConfig:
    values = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, data=str(data), out=str(out),
                  epochs=2, batch_size=8, lr=0.05, seed=3)
    return excite.TrainConfig(**{**values, **overrides})


def test_config_json_holds_the_resolved_pipeline_and_what_was_asked_for(image_folder, tmp_path, monkeypatch):
    # "preset auto" and "img_size null" used to be all config.json said of a folder of 16-px images.
    lines = []
    monkeypatch.chdir(image_folder.parent)
    excite.fit(tiny_config(image_folder.name, tmp_path / "run"), log=lines.append)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["preset"], config["img_size"], config["cache_images"]) == ("cifar", 32, True)
    assert config["data"] == str(image_folder)  # absolute, so a resume from elsewhere finds it
    assert config["requested"] == {"preset": "auto", "img_size": None, "cache_images": None,
                                   "data": image_folder.name}
    (line,) = [line for line in lines if line.startswith("Input")]
    assert line.startswith("Input (--preset auto chose cifar): resize to 32x32, random 32-px crop")
    assert "cifar mean (0.491, 0.482, 0.447)" in line and "image cache" in line
    # The file is a config again: the same options, a new run (and a new run id).
    again = excite.fit(excite.train.config.resolve_config(tmp_path / "run" / "config.json", out=str(tmp_path / "b")),
                       log=lambda _: None)
    second = json.loads((again.run_dir / "config.json").read_text())
    assert second["run_id"] != config["run_id"] and second["img_size"] == 32


def test_a_run_started_from_a_relative_path_resumes_from_any_folder(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(image_folder.parent)
    excite.fit(tiny_config(image_folder.name, tmp_path / "run", epochs=1), log=lambda _: None)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0, capsys.readouterr().err
    # The data moved: --data says where it is now.
    moved = shutil.move(image_folder, tmp_path / "moved")
    config = resume_config(tmp_path / "run", epochs=3, data=str(moved))
    assert config.data == str(moved)
    excite.fit(config, resume=True, log=lambda _: None)


def test_a_checkpoint_copied_from_another_run_is_refused(image_folder, tmp_path):
    a = excite.fit(tiny_config(image_folder, tmp_path / "a", epochs=1), log=lambda _: None).run_dir
    b = excite.fit(tiny_config(image_folder, tmp_path / "b", epochs=1, model="se_resnet20_cifar"),
                   log=lambda _: None).run_dir
    shutil.copy(a / "last.pt", b / "last.pt")
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="copied from another run directory"):
        excite.fit(resume_config(b, epochs=2), resume=True, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file() and p.name != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_a_damaged_environment_json_does_not_block_a_resume(image_folder, tmp_path):
    run = excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=1), log=lambda _: None).run_dir
    (run / "environment.json").write_text('[{"device": "cpu"')
    with pytest.warns(UserWarning, match="environment.json is damaged"):
        excite.fit(resume_config(run, epochs=2), resume=True, log=lambda _: None)
    sessions = json.loads((run / "environment.json").read_text())
    assert len(sessions) == 1 and sessions[0]["versions"]["excite"] == excite.__version__


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 1}, "cannot train on batches of one image"),
    ({"model_kwargs": {"widths": [4, 8, 8], "in_chans": 1}}, "in_chans=1 cannot train"),
])
def test_a_model_that_cannot_train_on_the_data_is_refused_before_training(image_folder, tmp_path, overrides, message):
    with pytest.raises(ExciteError, match=message) as info:
        excite.fit(tiny_config(image_folder, tmp_path / "run", **overrides), log=lambda _: None)
    assert "\n" not in str(info.value) and not (tmp_path / "run" / "last.pt").exists()


def test_resuming_with_more_epochs_says_what_the_schedule_does(image_folder, tmp_path):
    run = excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=2), log=lambda _: None).run_dir
    lines = []
    excite.fit(resume_config(run), resume=True, log=lines.append)
    assert any("already trained its 2 epochs" in line for line in lines)
    lines.clear()
    excite.fit(resume_config(run, epochs=4), resume=True, log=lines.append)
    (line,) = [line for line in lines if "schedule now spans" in line]
    assert "spans 4 epochs instead of 2: epoch 3 trains at lr 2.50E-02" in line
    assert "(the 2-epoch schedule was at 0.00E+00)" in line


def test_without_a_terminal_training_prints_progress_lines(image_folder, tmp_path):
    lines = []
    excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=1, progress_seconds=1e-9, sched="constant"),
               show_progress=False,
               log=lines.append)
    progress = [line for line in lines if line.startswith("  epoch 1 step")]
    assert progress and progress[0].startswith("  epoch 1 step 1/")
    assert all("loss" in line and "acc" in line and "lr 5.00E-02" in line and "img/s" in line for line in progress)
    lines.clear()
    excite.fit(tiny_config(image_folder, tmp_path / "off", epochs=1, progress_seconds=0), show_progress=False,
               log=lines.append)
    assert not [line for line in lines if line.startswith("  epoch")]


def test_a_resume_after_the_folder_changed_keeps_the_recorded_split(image_folder, tmp_path):
    # Removing a file (as the skipped-files advice suggests) used to redraw the split on resume: former training
    # images landed in validation without a word.
    run = excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=1), log=lambda _: None).run_dir
    recorded = load_checkpoint(run / "last.pt")["split"]
    (image_folder / recorded["train"][0]).unlink()
    (image_folder / "red" / "new.png").write_bytes((image_folder / recorded["train"][1]).read_bytes())
    lines = []
    excite.fit(resume_config(run, epochs=2), resume=True, log=lines.append)
    split = load_checkpoint(run / "last.pt")["split"]
    assert split["val"] == recorded["val"] and split["train"] == recorded["train"][1:]
    assert any("1 of its training images" in line and "1 new image" in line for line in lines), lines
    # eval --split val measures the recorded validation images: the run's own number.
    result = excite.inference.evaluate_checkpoint(run, str(image_folder), split="val", out=str(tmp_path / "eval"),
                                                  log=lambda _: None)
    assert result["images"] == len(recorded["val"])
    assert result["top1"] == pytest.approx(load_checkpoint(run / "last.pt")["best_acc"])


def test_on_a_terminal_the_progress_bar_shows_the_running_numbers():
    from excite.train.loop import EpochProgress, ProgressDisplay

    class Bar:
        postfix = None

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

    display, bar = ProgressDisplay(bar=True, log=lambda line: pytest.fail(f"printed {line!r}")), Bar()
    display.refresh_seconds = 0.0  # every step, for the test
    display.start()
    display.update(bar, EpochProgress(step=2, seen=16, loss_sum=8.0, correct=12, seconds=0.5), 4, 1, 0.1)
    assert bar.postfix == "loss 0.500, acc 75.0%, lr 1.00E-01, 32 img/s"


def test_a_run_records_its_models_size_and_its_peak_memory(image_folder, tmp_path):
    run = excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=1), log=lambda _: None).run_dir
    size = json.loads((run / "model.json").read_text())
    model = excite.create_model("resnet20_cifar", num_classes=3, widths=[4, 8, 8])
    assert size["total_params"] == sum(p.numel() for p in model.parameters())
    assert size["input_shape"] == [1, 3, 32, 32] and size["total_macs"] > 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["peak_memory_mib"] > 0
    best = json.loads((run / "best_val.json").read_text())
    assert best["epoch"] == 1 and best["classes"] == ["blue", "green", "red"]
    assert sum(map(sum, best["confusion"])) == sum(c["support"] for c in best["per_class"].values())
    assert best["accuracy"] == pytest.approx(row["val_acc"])


def test_loggers_receive_the_run_as_dicts_and_tensorboard_reads_back_its_events(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Recorder:
        wants_steps = True

        def __init__(self):
            self.calls = []

        def start(self, run_dir, config, start_epoch):
            self.calls.append(("start", start_epoch, config["model"]))

        def log_step(self, values):
            self.calls.append(("step", values["global_step"]))

        def log_epoch(self, row):
            self.calls.append(("epoch", row["epoch"], row["val_acc"]))

        def finish(self, result):
            self.calls.append(("finish", result["best_epoch"]))

    recorder, rows = Recorder(), []
    result = excite.fit(tiny_config(image_folder, tmp_path / "run", logger="tensorboard"), log=lambda _: None,
                        loggers=[recorder, rows.append])
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert recorder.calls[0] == ("start", 1, "resnet20_cifar") and recorder.calls[-1] == ("finish", result.best_epoch)
    assert [c[1] for c in steps] == list(range(1, len(steps) + 1)) and len(steps) % 2 == 0
    assert [row["epoch"] for row in rows] == [1, 2] and [r["val_acc"] for r in rows] == [
        h["val_acc"] for h in result.history]

    events = EventAccumulator(str(result.run_dir)).Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [h["epoch"] for h in result.history]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([h["val_acc"] for h in result.history])
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([h["lr"] for h in result.history])
    hparams = EventAccumulator(str(result.run_dir), size_guidance={"tensors": 0}).Reload()
    assert "hparam/best_val_acc" in hparams.Tags()["scalars"] + hparams.Tags()["tensors"]


def test_a_missing_tensorboard_is_one_line_before_anything_is_created(image_folder, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ExciteError, match=r"pip install 'excite\[tensorboard\]'"):
        excite.fit(tiny_config(image_folder, tmp_path / "run", logger="tensorboard"), log=lambda _: None)
    assert not (tmp_path / "run").exists()
