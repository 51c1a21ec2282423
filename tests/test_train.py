"""The training pipeline end to end on a generated folder: artefacts, eval, predict, resume, config files."""
import json
import re

import pytest
import torch

import excite
import excite.inference
from excite.cli import DEMO_CONFIG, main
from excite.data import build_transform, decode_image
from excite.errors import ExciteError, NonFiniteLossError
from excite.train.checkpoint import load_checkpoint, model_from_checkpoint
from excite.train.config import resolve_config
from excite.train.loop import predict_logits

EPOCH_LINE = re.compile(r"^Epoch: ?\d+, Train_acc:\d+\.\d%, Train_loss:\d+\.\d{3}, Val_acc:\d+\.\d%, "
                        r"Val_loss:\d+\.\d{3}, Lr:\d\.\d\dE[+-]\d\d, Time:\d+\.\ds, \d+ img/s$")


def tiny_config(data, out, **overrides) -> excite.TrainConfig:
    values = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, data=str(data), out=str(out),
                  epochs=2, batch_size=8, img_size=16, lr=0.05, seed=3)
    return excite.TrainConfig(**{**values, **overrides})


def test_two_epochs_write_every_artifact(image_folder, tmp_path):
    lines = []
    result = excite.fit(tiny_config(image_folder, tmp_path / "run", save="all"), log=lines.append)
    run = result.run_dir

    epoch_lines = [line for line in lines if line.startswith("Epoch:")]
    assert len(epoch_lines) == 2 and all(EPOCH_LINE.match(line) for line in epoch_lines), epoch_lines

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "resnet20_cifar" and config["epochs"] == 2 and config["out"] == str(run)
    (session,) = json.loads((run / "environment.json").read_text())
    assert session["versions"]["torch"] == torch.__version__ and session["versions"]["excite"] == excite.__version__

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(0 <= row["val_acc"] <= 1 and row["train_loss"] > 0 for row in rows)
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_acc,train_loss,val_acc,val_loss") and len(csv_lines) == 3

    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == 2 and last["classes"] == ["blue", "green", "red"]
    assert last["model_name"] == "resnet20_cifar" and last["model_kwargs"]["num_classes"] == 3
    assert best["epoch"] == result.best_epoch and best["best_acc"] == pytest.approx(result.best_acc)
    assert result.best_acc == max(row["val_acc"] for row in rows)
    # The safetensors export rebuilds the same model without the pickle-based checkpoint.
    model = excite.create_model("resnet20_cifar", num_classes=3, widths=[4, 8, 8])
    excite.load_weights(model, run / "best.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best["model"].items())


def test_eval_and_predict_from_the_checkpoint(image_folder, tmp_path, capsys):
    run = excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=3), log=lambda _: None).run_dir

    assert main(["eval", "--checkpoint", str(run), "--data", str(image_folder), "--split", "all",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    images = sum(1 for p in image_folder.rglob("*.png"))
    assert report["images"] == images and report["split"] == "all"
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert set(report["per_class"]) == {"blue", "green", "red"}
    assert sum(row["support"] for row in report["per_class"].values()) == images
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "top-1" in capsys.readouterr().out

    # auto: the run's own validation split (20% of the folder, stratified).
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--data", str(image_folder),
                 "--out", str(tmp_path / "eval-val")]) == 0
    val_report = json.loads((tmp_path / "eval-val" / "eval.json").read_text())
    assert val_report["split"] == "val" and val_report["images"] < images
    best_acc = load_checkpoint(run / "last.pt")["best_acc"]
    assert val_report["top1"] == pytest.approx(best_acc)  # same images, same weights, same number

    capsys.readouterr()
    (image_folder / "red" / "._000.png").write_bytes(b"\0\5\26\7")  # macOS metadata, not an image: not listed
    assert main(["predict", "--checkpoint", str(run), "--topk", "2", str(image_folder / "red")]) == 0
    printed = capsys.readouterr()
    out = printed.out.strip().splitlines()
    assert len(out) == len(list((image_folder / "red").glob("[!.]*.png"))) and printed.err == ""
    for line in out:
        path, _, ranked = line.partition(": ")
        pairs = [item.rsplit(" ", 1) for item in ranked.split(", ")]
        assert len(pairs) == 2 and all(name in {"blue", "green", "red"} for name, _ in pairs)
        probs = [float(p.rstrip("%")) for _, p in pairs]
        assert probs[0] >= probs[1] and sum(probs) <= 100.05


def test_resume_ends_like_an_uninterrupted_run(image_folder, tmp_path):
    full = excite.fit(tiny_config(image_folder, tmp_path / "full", epochs=3), log=lambda _: None)

    def stop_in_epoch_3(line):  # Ctrl-C after epoch 3 trained but before its checkpoint was written
        if line.startswith("Epoch: 3"):
            raise KeyboardInterrupt

    with pytest.raises(ExciteError, match=f"excite train --resume {tmp_path / 'split'}"):
        excite.fit(tiny_config(image_folder, tmp_path / "split", epochs=3), log=stop_in_epoch_3)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 2
    lines = []
    resumed = excite.fit(excite.resume_config(tmp_path / "split"), resume=True, log=lines.append)

    assert any(line.startswith(f"Resuming {tmp_path / 'split'} from epoch 2, to epoch 3") for line in lines)
    assert [line for line in lines if line.startswith("Epoch:")][0].startswith("Epoch: 3")
    assert len(resumed.history) == len(full.history) == 3
    timing = ("epoch_seconds", "train_images_per_s", "peak_memory_mib")  # what differs between equal runs
    for a, b in zip(full.history, resumed.history):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((tmp_path / "split" / "environment.json").read_text())) == 2  # the start and the resume
    jsonl = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in jsonl] == [1, 2, 3]


def test_cli_train_with_config_file_and_override(image_folder, tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        'model = "resnet20_cifar"\nepochs = 5\nbatch-size = 8\nimg-size = 16\nopt = "adamw"\nlr = 0.01\n'
        "[model_kwargs]\nwidths = [4, 8, 8]\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--data", str(image_folder), "--epochs", "1",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["opt"] == "adamw" and saved["model_kwargs"] == {"widths": [4, 8, 8]}
    assert resolve_config(out / "config.json").opt == "adamw"  # the saved config is a valid config file
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_demo_configuration_runs(tmp_path):
    # The README's demo command runs DEMO_CONFIG for 15 epochs; one epoch here proves the set-up works.
    config = resolve_config(None, **{**DEMO_CONFIG, "epochs": 1, "out": str(tmp_path / "demo")})
    result = excite.fit(config, log=lambda _: None)
    assert len(result.history) == 1 and 0 <= result.best_acc <= 1
    assert load_checkpoint(result.run_dir / "last.pt")["classes"] == [str(d) for d in range(10)]


def test_image_cache_path_trains_resumes_and_evaluates_like_the_loader(image_folder, tmp_path):
    from excite.data import build_data, make_loader
    from excite.data.gpu_cache import cached_loaders
    from excite.train.loop import Precision, evaluate

    full = excite.fit(tiny_config(image_folder, tmp_path / "full", epochs=2, cache_images=True), log=lambda _: None)
    assert len(full.history) == 2 and full.history[-1]["train_loss"] < full.history[0]["train_loss"]

    # Resuming the cached path repeats the uninterrupted run exactly too.
    def stop_in_epoch_2(line):
        if line.startswith("Epoch: 2"):
            raise KeyboardInterrupt

    with pytest.raises(ExciteError):
        excite.fit(tiny_config(image_folder, tmp_path / "split", epochs=2, cache_images=True), log=stop_in_epoch_2)
    excite.fit(excite.resume_config(tmp_path / "split"), resume=True, log=lambda _: None)
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Validation batches from the cache are the per-image pipeline's: same model, same numbers.
    bundle = build_data(str(image_folder), img_size=16, batch_size=8, seed=3)
    _, cached_val = cached_loaders(bundle, 8, device="cpu")
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "full" / "last.pt"))
    precision = Precision(torch.device("cpu"))
    plain = evaluate(model, make_loader(bundle.val, 8, train=False), precision, 3)
    fast = evaluate(model, cached_val, precision, 3)
    assert torch.equal(plain.confusion, fast.confusion)
    assert fast.loss == pytest.approx(plain.loss, rel=1e-5)


def test_recipe_sets_defaults_that_flags_override():
    config = resolve_config(None, recipe="cifar-fast", epochs=1)
    assert config.model == "se_resnet18_cifar" and config.cache_images and config.amp == "bf16"
    assert config.epochs == 1  # the flag wins over the recipe
    with pytest.raises(ExciteError, match="unknown recipe 'fastest'"):
        resolve_config(None, recipe="fastest")


def test_pretrained_weights_start_the_run(image_folder, tmp_path):
    # A 10-class source: everything but the classifier fits the 3-class run, and the run says so.
    source = excite.create_model("resnet20_cifar", widths=[4, 8, 8], num_classes=10)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    lines = []
    with pytest.warns(UserWarning, match="classifier left at its initial values"):
        excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=1, lr=1e-12,
                               pretrained=str(tmp_path / "source.pt")), log=lines.append)
    assert any("classifier left at its initial values" in line for line in lines)
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    # lr 1e-12: one epoch cannot move the weights, so they are still the source's (and not a fresh init).
    for key in ("conv1.weight", "layer3.2.conv2.weight"):
        torch.testing.assert_close(trained[key], source.state_dict()[key], rtol=0, atol=1e-9)
    assert trained["fc.weight"].shape == (3, 8)


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 6))  # not mirror-symmetric
    x = torch.randn(2, 3, 4, 5)
    logits = predict_logits(model, x, "flip")
    torch.testing.assert_close(logits, (model(x) + model(x.flip(-1))) / 2)
    assert not torch.allclose(logits, model(x))
    assert torch.equal(predict_logits(model, x), model(x)) and torch.equal(predict_logits(model, x, "none"), model(x))
    with pytest.raises(ValueError, match="'none' or 'flip'"):
        predict_logits(model, x, None)


def test_a_run_validated_with_flip_tta_is_evaluated_and_predicted_with_it(image_folder, tmp_path, capsys):
    result = excite.fit(tiny_config(image_folder, tmp_path / "run", tta="flip"), log=lambda _: None)
    run = result.run_dir
    best = load_checkpoint(run / "best.safetensors")
    assert best["config"]["tta"] == "flip"
    assert main(["eval", "--checkpoint", str(run), "--data", str(image_folder), "--out", str(tmp_path / "a")]) == 0
    auto = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert auto["tta"] == "flip" and auto["top1"] == pytest.approx(result.best_acc)
    assert main(["eval", "--checkpoint", str(run), "--data", str(image_folder), "--tta", "none",
                 "--out", str(tmp_path / "b")]) == 0
    plain = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(auto["loss"], rel=1e-6)

    image = sorted((image_folder / "red").glob("*.png"))[0]
    model, classes = model_from_checkpoint(best)
    x = build_transform(best["preset"], best["img_size"], train=False)(decode_image(image))[None]
    with torch.no_grad():
        expected = predict_logits(model.eval(), x, "flip").softmax(1)[0]
    ((_, top),) = list(excite.inference.predict(run, [image], topk=3))
    assert [name for name, _ in top] == [classes[i] for i in expected.argsort(descending=True).tolist()]
    assert [p for _, p in top] == pytest.approx(sorted(expected.tolist(), reverse=True), rel=1e-4)


@pytest.mark.filterwarnings("error")
def test_fp16_steps_go_through_the_grad_scaler_which_skips_overflowing_ones():
    from excite.train.loop import Precision, train_one_epoch

    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(3, (4,))) for _ in range(2)]

    def one_epoch(init_scale: float):
        model = excite.create_model("resnet20_cifar", num_classes=3, widths=[4, 8, 8])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        stats = train_one_epoch(model, batches, optimizer, scheduler, Precision(torch.device("cpu"), "fp16"),
                                epoch=1, scaler=scaler)
        changed = any(not torch.equal(before[k], v) for k, v in model.named_parameters())
        return stats, changed, scaler.get_scale()

    stats, changed, scale = one_epoch(2.0**8)
    assert stats.images == 8 and stats.loss > 0 and changed and scale == 2.0**8
    # Scaled by 2^60 the fp16 gradients overflow: both steps are skipped and the scale halves each time.
    stats, changed, scale = one_epoch(2.0**60)
    assert stats.images == 8 and not changed and scale == 2.0**58


def test_the_lr_column_holds_the_rate_each_epoch_trained_with(image_folder, tmp_path):
    # StepLR-style decay every epoch: epoch 1 trains at 0.01, epoch 2 at 0.001. The column used to show the
    # rate after the epoch's last scheduler step, one epoch ahead (1.00E-03 on epoch 1).
    lines = []
    config = tiny_config(image_folder, tmp_path / "run", sched="step", step_size=1, gamma=0.1, lr=0.01)
    excite.fit(config, log=lines.append)
    epoch_lines = [line for line in lines if line.startswith("Epoch:")]
    assert "Lr:1.00E-02" in epoch_lines[0] and "Lr:1.00E-03" in epoch_lines[1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == pytest.approx([0.01, 0.001])
    assert [row["lr_last"] for row in rows] == pytest.approx([0.01, 0.001])

    # Cosine: each epoch's first step trains at the rate the schedule gives it, never at 0 in the last epoch.
    steps = []
    cosine = tiny_config(image_folder, tmp_path / "cosine", sched="cosine", lr=0.01)
    excite.fit(cosine, log=lambda _: None, on_step=steps.append)
    rows = [json.loads(line) for line in (tmp_path / "cosine" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(steps) // 2
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[1]["lr"] > 0
    assert [row["lr"] for row in rows] == pytest.approx([steps[0]["lr"], steps[per_epoch]["lr"]])
    assert rows[1]["lr_last"] == pytest.approx(steps[-1]["lr"])
    assert [s["step"] for s in steps] == list(range(1, per_epoch + 1)) * 2


def test_the_save_policy_decides_which_checkpoint_files_a_run_keeps(image_folder, tmp_path):
    files = {}
    for policy in ("best", "all", "last"):
        run = excite.fit(tiny_config(image_folder, tmp_path / policy, save=policy), log=lambda _: None).run_dir
        files[policy] = {p.name for p in run.iterdir() if p.suffix in (".pt", ".safetensors")}
        # eval finds the weights the policy kept.
        assert main(["eval", "--checkpoint", str(run), "--data", str(image_folder), "--split", "all",
                     "--out", str(tmp_path / f"eval-{policy}")]) == 0
    assert files == {"best": {"last.pt", "best.safetensors"}, "all": {"last.pt", "best.pt", "best.safetensors"},
                     "last": {"last.pt"}}


def test_weights_that_become_non_finite_are_never_checkpointed(image_folder, tmp_path, monkeypatch):
    # A step that leaves a BatchNorm statistic infinite though its loss was finite: no checkpoint may hold it.
    import importlib

    fit_module = importlib.import_module("excite.train.fit")
    real = fit_module.train_one_epoch

    def poisoned(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        if kwargs["epoch"] == 2:
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
        return stats

    monkeypatch.setattr(fit_module, "train_one_epoch", poisoned)
    with pytest.raises(NonFiniteLossError, match="became NaN or infinite after epoch 2") as info:
        excite.fit(tiny_config(image_folder, tmp_path / "run", epochs=3), log=lambda _: None)
    assert "last good checkpoint" in str(info.value) and "(epoch 1)" in str(info.value)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
