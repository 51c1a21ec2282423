"""excite compare: the table against the run files, the files it writes, which runs it refuses, --force, older runs."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from excite.cli import main
from excite.errors import ExciteError
from excite.experiments.compare import compare_runs, non_default_arguments
from excite.train.checkpoint import load_checkpoint, save_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit

TINY = dict(epochs=2, batch_size=8, img_size=16, device="cpu")
WIDTHS = {"widths": [4, 8, 8]}


def _train(out: Path, data: Path, model: str = "resnet20_cifar", seed: int = 0, **kwargs) -> Path:
    fit(TrainConfig(model=model, model_kwargs={**WIDTHS, **kwargs}, data=str(data), seed=seed, out=str(out), **TINY),
        log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_image_folder) -> dict[str, Path]:
    """Tiny runs shared by the tests: three comparable ones in sweep/ (ResNet, SE-ResNet, ResNet of another
    seed), and others that must not be compared with them."""
    root = tmp_path_factory.mktemp("compare")
    images = make_image_folder(root / "images")
    found = {
        "resnet": _train(root / "sweep" / "resnet", images),
        # attn_layer=se is se_resnet20_cifar's own default: the table must not list it.
        "se_resnet": _train(root / "sweep" / "se_resnet", images, model="se_resnet20_cifar", attn_layer="se"),
        "resnet_seed1": _train(root / "sweep" / "resnet_seed1", images, seed=1),
        "other_data": _train(root / "other" / "other_data", make_image_folder(root / "images2", seed=1)),
    }
    make_image_folder(root / "more", per_class=3, colours={"blue": (30, 60, 200)}, seed=2)
    for i, png in enumerate(sorted((root / "more" / "blue").iterdir())):  # the folder grows between two runs
        shutil.copy(png, images / "blue" / f"new{i}.png")
    found["more_images"] = _train(root / "other" / "more_images", images)
    make_image_folder(images, per_class=12, colours={"yellow": (220, 220, 40)}, seed=3)
    found["four_classes"] = _train(root / "other" / "four_classes", images)
    return found


def _json(path: Path):
    return json.loads(path.read_text())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_table_holds_the_numbers_of_the_run_files(runs, tmp_path):
    paths = [runs["resnet"], runs["se_resnet"], runs["resnet_seed1"]]
    comparison = compare_runs(paths, out=tmp_path / "cmp")
    assert [row["name"] for row in comparison.rows] == ["resnet", "se_resnet", "resnet_seed1"]
    for row, run in zip(comparison.rows, paths):
        model, best, metrics = _json(run / "model.json"), _json(run / "best_val.json"), _metrics(run)
        assert row["model"] == _json(run / "config.json")["model"]
        assert row["params"] == model["total_params"] and row["macs"] == model["total_macs"]
        assert row["best_val_acc"] == best["val_acc"] and row["best_epoch"] == best["epoch"]
        assert row["final_val_acc"] == metrics[-1]["val_acc"]
        assert row["train_seconds"] == pytest.approx(sum(m["epoch_seconds"] for m in metrics))
        assert row["images_per_s"] == pytest.approx(sum(m["train_images_per_s"] for m in metrics) / len(metrics))
        assert row["peak_memory_mib"] == max(m["peak_memory_mib"] for m in metrics)
    resnet, se_resnet, seed1 = comparison.rows
    assert resnet["arguments"] == se_resnet["arguments"] == "widths=[4, 8, 8]"  # not se_resnet's attn_layer=se
    assert se_resnet["params"] > resnet["params"] == seed1["params"]
    assert (resnet["seed"], seed1["seed"]) == (0, 1)
    assert not comparison.warnings
    assert any("validation images differ by seed (seeds 0, 1)" in note for note in comparison.notes)


def test_csv_and_markdown_are_written(runs, tmp_path):
    comparison = compare_runs([runs["resnet"], runs["se_resnet"]], out=tmp_path / "cmp")
    for name in ("comparison.csv", "comparison.md", "curves.png", "per_class.png", "accuracy_vs_cost.png",
                 "report.html"):
        assert comparison.files[name] == tmp_path / "cmp" / name and comparison.files[name].is_file()
    assert comparison.files["curves.png"].read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        written = list(csv.DictReader(f))
    for row, raw in zip(written, comparison.rows):
        assert row["name"] == raw["name"] and int(row["params"]) == raw["params"]
        assert math.isclose(float(row["best_val_acc"]), raw["best_val_acc"])
        assert Path(row["path"]) == Path(raw["path"]) and Path(row["path"]).is_absolute()
    markdown = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    table = comparison.table()
    for shown in table:
        line = next(line for line in markdown if line.startswith(f"| {shown['run']} |"))
        assert f"| {shown['best val acc']} |" in line and f"| {shown['params']} |" in line
    assert table[0]["best val acc"] == f"{comparison.rows[0]['best_val_acc']:.1%}"


def test_cli_compares_a_folder_of_runs(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is comparison-<time>/ in the current folder
    assert main(["compare", str(runs["resnet"].parent)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "arguments"]
    assert [line.split()[0] for line in lines[2:5]] == ["resnet", "resnet_seed1", "se_resnet"]  # name order
    (written,) = tmp_path.glob("comparison-*")
    assert (written / "report.html").is_file() and str(written.name) in out


@pytest.mark.parametrize("other, reason", [
    ("other_data", "were trained on different data ("),
    ("four_classes", "have different classes (only in resnet: none; only in four_classes: yellow)"),
    ("more_images", "were validated on different images (their recorded splits differ)"),
])
def test_incomparable_runs_are_refused_in_one_line(runs, tmp_path, capsys, other, reason):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["resnet"]), str(runs[other]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"runs resnet and {other} {reason}" in err
    assert err.rstrip().endswith("compare runs of the same data and split, or pass --force")
    assert not out.exists()


def test_force_compares_and_flags_it_at_the_top_of_the_report(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["resnet"]), str(runs["other_data"]), str(runs["four_classes"]), "--force",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "excite: warning: compared with --force although runs resnet and other_data were trained on different" in err
    assert "runs resnet and four_classes have different classes" in err
    page = (out / "report.html").read_text()
    warning = page.index('<div class="warning"')
    assert warning < page.index("<h2>")  # above everything else
    assert "compared with --force although runs resnet and other_data were trained on different data" in page
    assert "> **Warning:** compared with --force" in (out / "comparison.md").read_text()


def test_an_older_run_without_model_json_best_val_or_split_still_compares(runs, tmp_path):
    old = tmp_path / "old_resnet"
    shutil.copytree(runs["resnet"], old)
    (old / "model.json").unlink()
    (old / "best_val.json").unlink()
    checkpoint = load_checkpoint(old / "last.pt")
    del checkpoint["split"]
    save_checkpoint(old / "last.pt", checkpoint)

    comparison = compare_runs([runs["resnet"], old], out=tmp_path / "cmp")
    new_row, old_row = comparison.rows
    for key in ("params", "macs", "best_val_acc", "best_epoch", "final_val_acc", "train_seconds"):
        assert old_row[key] == pytest.approx(new_row[key]), key  # counted by building the model; from metrics.jsonl
    notes = "\n".join(comparison.notes)
    assert "old_resnet has no model.json" in notes and "old_resnet has no best_val.json" in notes
    assert "old_resnet records no split" in notes
    assert sorted(name for name in comparison.files if name.startswith("confusion-")) == ["confusion-01-resnet.png"]
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "old_resnet has no model.json (trained by an older excite)" in page


def test_non_default_arguments_are_those_that_change_the_model():
    assert non_default_arguments("densenet_bc_100", {"growth_rate": 12}) == {}  # the builder's own value
    assert non_default_arguments("densenet_bc_100", {"growth_rate": 24}) == {"growth_rate": 24}
    assert non_default_arguments("se_resnet20_cifar", {"attn_layer": "se", "widths": [16, 32, 64]}) == {}
    assert non_default_arguments("resnet20_cifar", {"attn_layer": "se", "drop_rate": 0.0, "widths": [4, 8, 8]}) == {
        "attn_layer": "se", "widths": [4, 8, 8]}
    assert non_default_arguments("densenet121", {"drop_rate": 0.2}, num_classes=3) == {"drop_rate": 0.2}


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no run directory" in err
    with pytest.raises(ExciteError, match="is not a directory"):
        compare_runs([tmp_path / "missing"])
