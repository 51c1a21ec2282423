"""excite sweep: the grid from the command line, one-line mistakes, a sweep end to end, a killed sweep continued,
two processes sharing one study. Tiny runs: ResNet-20 with 4-8-8 channels on 8-px images, 1-2 epochs, CPU."""
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import excite.experiments.sweep as sweep
from excite.cli import build_parser, main
from excite.experiments.grid import grid_points, plan_from_args, split_values
from excite.train.checkpoint import load_checkpoint

optuna = pytest.importorskip("optuna")

TINY = ["--model-arg", "widths=[4,8,8]", "--img-size", "8", "--batch-size", "16", "--device", "cpu", "--workers", "0",
        "--progress-seconds", "0"]
MODELS = ["--model", "resnet20_cifar,se_resnet20_cifar"]
GRID_NAMES = ["resnet20_cifar-seed0", "se_resnet20_cifar-seed0", "resnet20_cifar-seed1", "se_resnet20_cifar-seed1"]


def plan_of(*argv):
    return plan_from_args(build_parser().parse_args(["sweep", *argv]))


def sweep_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", *argv])
    return code, out.getvalue(), err.getvalue()


def trials_by_run(storage: str, study_name: str) -> dict[str, list]:
    study = optuna.load_study(study_name=study_name, storage=storage)
    found: dict[str, list] = {}
    for trial in study.trials:
        found.setdefault(trial.user_attrs.get("run"), []).append(trial)
    return found


def one_thread_env() -> dict:
    # Two processes of two torch threads each on a 2-core machine slow each other down several times over.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def sessions(run_dir: Path) -> int:
    return len(json.loads((run_dir / "environment.json").read_text()))


# --- the grid, without training -------------------------------------------------------------------------------


def test_values_split_at_commas_outside_brackets():
    assert split_values("12,24") == ["12", "24"]
    assert split_values("[4,4,4],[6, 6,6]") == ["[4,4,4]", "[6, 6,6]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("0.1") == ["0.1"]


def test_grid_expansion_and_names():
    plan = plan_of("--data", "d/", *MODELS, "--model-arg", "growth_rate=12,24", "--model-arg", "block_config=[4,4,4]",
                   "--lr", "0.05", "--seeds", "2", "--epochs", "30")
    assert [(a.name, a.values, a.model_arg) for a in plan.axes] == [
        ("model", ("resnet20_cifar", "se_resnet20_cifar"), False), ("growth_rate", (12, 24), True)]
    assert plan.seeds == [0, 1]
    assert plan.fixed == {"data": "d/", "lr": 0.05, "epochs": 30, "model_kwargs": {"block_config": [4, 4, 4]}}
    points = grid_points(plan)
    # Seeds outermost: each seed's variants finish before the next seed's start.
    assert [p.name for p in points[:5]] == [
        "resnet20_cifar-growth_rate=12-seed0", "resnet20_cifar-growth_rate=24-seed0",
        "se_resnet20_cifar-growth_rate=12-seed0", "se_resnet20_cifar-growth_rate=24-seed0",
        "resnet20_cifar-growth_rate=12-seed1"]
    assert len(points) == 8 and points[3].values == {"model": "se_resnet20_cifar", "growth_rate": 24}
    # Only what varies is named: one model and one seed leave only the learning rates; a list is readable.
    plan = plan_of("--model", "densenet121", "--lr", "0.05,1e-4", "--seed", "3",
                   "--model-arg", "block_config=[4,4,4],[6,6,6]")
    assert [p.name for p in grid_points(plan)] == [
        "lr=0.05-block_config=4_4_4", "lr=0.05-block_config=6_6_6", "lr=0.0001-block_config=4_4_4",
        "lr=0.0001-block_config=6_6_6"]
    assert plan.seeds == [3] and plan.fixed["model"] == "densenet121"
    assert plan_of("--seed", "0,1,2").seeds == [0, 1, 2] and plan_of().seeds == [0, 1, 2]  # 3 seeds by default


def test_each_grid_point_is_a_validated_train_config(tmp_path):
    from excite.experiments.grid import grid_configs

    plan = plan_of("--data", "d/", *MODELS, "--opt", "adam,sgd", "--no-hflip", "--seeds", "2", *TINY)
    configs = grid_configs(plan, tmp_path / "s")
    config = configs["se_resnet20_cifar-opt=sgd-seed1"]
    assert (config.model, config.opt, config.seed, config.hflip, config.model_kwargs) == (
        "se_resnet20_cifar", "sgd", 1, False, {"widths": [4, 8, 8]})
    assert config.out == str(tmp_path / "s" / "se_resnet20_cifar-opt=sgd-seed1")
    assert len(configs) == 8


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0.1,-1"], "run lr=-1.0-seed0: --lr must be positive, got -1.0"),
    (["--lr", "0.1,fast"], "--lr 'fast' is not a number"),
    (["--opt", "sgd,adamm"], "--opt 'adamm' is not valid: choose one of sgd, adam, adamw"),
    (["--epochs", "2,,3"], "--epochs '2,,3' has an empty value"),
    (["--lr", "0.1,0.1"], "--lr lists 0.1 twice"),
    (["--device", "cpu,cuda"], "--device takes one value for the whole sweep"),
    (["--seeds", "2", "--seed", "0,1"], "give either --seeds N or --seed A,B,..., not both"),
    (["--model-arg", "k=1", "--model-arg", "k=2"], "--model-arg k is given twice"),
    (["--model-arg", "lr=1,2"], "--model-arg lr shares its name with the train option --lr"),
    (["--trials", "3"], "--trials counts the trials of --search"),
    (["--search", "lr=0.1"], "--search 'lr=0.1': expected KEY=LOW:HIGH[:log]"),
    (["--search", "opt=1:2"], "--search opt: not a numeric train option"),
    (["--search", "lr=0:1:log"], "a log scale needs LOW above 0"),
    (["--search", "lr=0.1:0.2", "--lr", "0.1"], "--lr is both given and searched"),
    (["--search", "lr=0.1:0.2", "--model", "a,b"], "--search tunes options with Optuna's sampler, so --model takes"),
    (["--search", "epochs=0:3"], "--search at its low end: --epochs must be at least 1, got 0"),
    (["--model", "resnet20_cifar,resnet2_cifar"], "unknown model 'resnet2_cifar'"),
    (["--model", "resnet20_cifar", "--model-arg", "widths=[4,8],[4,8,8]"], "cannot build resnet20_cifar with"),
])
def test_mistakes_are_one_line_before_anything_runs(tmp_path, argv, message):
    code, out, err = sweep_cli("--data", str(tmp_path), "--out", str(tmp_path / "s"), *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("excite: error: ") and message in err, err
    assert not (tmp_path / "s").exists()


def test_the_readme_sweeps_are_valid_grids(tmp_path):
    from excite.experiments.grid import grid_configs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Experiments: does SE help on my data?", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line)[2:] for line in section.splitlines() if line.startswith("excite sweep --data")]
    se, growth = (plan_of(*argv) for argv in commands)
    assert [p.name for p in grid_points(se)][:2] == ["resnet20_cifar-seed0", "se_resnet20_cifar-seed0"]
    assert len(grid_points(se)) == 6
    configs = grid_configs(growth, tmp_path)
    assert sorted({(c.model_kwargs["growth_rate"], c.seed) for c in configs.values()}) == [
        (12, 0), (12, 1), (12, 2), (24, 0), (24, 1), (24, 2)]
    assert {(c.preset, c.img_size, c.hflip, c.epochs) for c in configs.values()} == {("imagenet", 224, False, 20)}


def test_missing_optuna_says_which_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    code, _, err = sweep_cli("--data", str(tmp_path), "--out", str(tmp_path / "s"))
    assert code == 2 and err == "excite: error: excite sweep needs Optuna: pip install 'excite[sweep]'\n"


def test_help_does_not_import_torch():
    code = ("import sys, excite.cli\n"
            "try:\n"
            "    excite.cli.main(['sweep', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--report-only" in done.stdout and done.stderr.splitlines()[-1] == "torch not imported"


# --- sweeps that train -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, make_image_folder):
    """A finished 2 models x 2 seeds sweep, 2 epochs each, trained through the CLI in this process."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_image_folder(root / "images")
    argv = ["--data", str(data), *MODELS, "--seeds", "2", "--epochs", "2", *TINY, "--out", str(root / "s")]
    code, out, err = sweep_cli(*argv)
    assert code == 0, err
    return root / "s", argv, out


def test_sweep_end_to_end(grid_sweep):
    sweep_dir, _, out = grid_sweep
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert sorted(t.user_attrs["run"] for t in study.trials) == sorted(GRID_NAMES)
    for trial in study.trials:
        run_dir = sweep_dir / trial.user_attrs["run"]
        checkpoint = load_checkpoint(run_dir / "last.pt")
        assert checkpoint["epoch"] == 2 and checkpoint["config"]["epochs"] == 2 and sessions(run_dir) == 1
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == checkpoint["best_acc"]
        assert trial.params == {"model": checkpoint["model_name"], "seed": checkpoint["config"]["seed"]}
        assert trial.user_attrs["run_dirs"] == [str(run_dir)]
        assert trial.user_attrs["final_val_acc"] == checkpoint["metrics"][-1]["val_acc"]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == GRID_NAMES
    assert record["plan"]["axes"] == [{"name": "model", "values": ["resnet20_cifar", "se_resnet20_cifar"],
                                       "model_arg": False}]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [v["label"] for v in summary["variants"]] == ["resnet20_cifar", "se_resnet20_cifar"]
    (comparison,) = summary["comparisons"]
    assert comparison["seeds"] == [0, 1] and comparison["sentence"].startswith("se_resnet20_cifar vs resnet20_cifar: ")
    plain = [load_checkpoint(sweep_dir / f"resnet20_cifar-seed{s}" / "last.pt")["best_acc"] for s in (0, 1)]
    se = [load_checkpoint(sweep_dir / f"se_resnet20_cifar-seed{s}" / "last.pt")["best_acc"] for s in (0, 1)]
    assert comparison["mean"] == pytest.approx((se[0] - plain[0] + se[1] - plain[1]) / 2)
    assert "4 of 4 runs finished" in out and comparison["sentence"] in out
    assert comparison["sentence"] in (sweep_dir / "summary.md").read_text()


def test_report_only_and_a_second_start_train_nothing(grid_sweep, monkeypatch):
    sweep_dir, argv, out = grid_sweep
    (sweep_dir / "summary.md").unlink()
    code, report_out, err = sweep_cli("--report-only", str(sweep_dir))
    assert code == 0, err
    assert (sweep_dir / "summary.md").is_file()
    assert report_out.splitlines()[-4:] == out.splitlines()[-4:]  # the same table and sentence

    calls = []
    monkeypatch.setattr(sweep, "fit", lambda *a, **k: calls.append(a))
    code, again, err = sweep_cli(*argv)
    assert code == 0 and calls == [], err
    assert again.splitlines()[-4:] == out.splitlines()[-4:]
    code, _, err = sweep_cli("--report-only", str(sweep_dir), "--lr", "0.1")
    assert code == 2 and "--report-only DIR takes no other options (got --lr)" in err


def test_other_options_in_a_sweep_directory_are_refused(grid_sweep):
    sweep_dir, argv, _ = grid_sweep
    code, _, err = sweep_cli(*argv, "--lr", "0.2")
    assert code == 2 and err.count("\n") == 1
    assert f"{sweep_dir} holds a sweep of other options (--lr differ" in err
    code, _, err = sweep_cli("--report-only", str(sweep_dir.parent))
    assert code == 2 and "is not a sweep directory" in err


KILL_SECOND_RUN = textwrap.dedent("""
    import os, sys
    import excite.experiments.sweep as sweep
    from excite.cli import main

    real_fit, started = sweep.fit, []

    def fit(config, **kwargs):
        started.append(config.out)
        if len(started) == 2:  # the second run dies at its first step of epoch 2, as from kill -9
            kwargs["on_step"] = lambda step: os._exit(9) if step["epoch"] == 2 else None
        return real_fit(config, **kwargs)

    sweep.fit = fit
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_killed_sweep_continues(tmp_path, make_image_folder, monkeypatch):
    data = make_image_folder(tmp_path / "images")
    sweep_dir = tmp_path / "s"
    argv = ["sweep", "--data", str(data), *MODELS, "--seeds", "2", "--epochs", "2", *TINY, "--out", str(sweep_dir)]
    killed = subprocess.run([sys.executable, "-c", KILL_SECOND_RUN, *argv], capture_output=True, text=True,
                            timeout=300, env=one_thread_env())
    assert killed.returncode == 9, killed.stderr
    # What the kill left: one run finished, one at epoch 1 of 2, its trial RUNNING, the last two not started.
    first, second, *rest = (sweep_dir / name for name in GRID_NAMES)
    assert load_checkpoint(first / "last.pt")["epoch"] == 2 and load_checkpoint(second / "last.pt")["epoch"] == 1
    assert not any(run_dir.exists() for run_dir in rest)
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    states = {name: [t.state.name for t in trials] for name, trials in trials_by_run(storage, "s").items()}
    assert states[GRID_NAMES[1]] == ["RUNNING"]
    finished_bytes, finished_mtime = (first / "last.pt").read_bytes(), (first / "last.pt").stat().st_mtime_ns

    calls = []
    real_fit = sweep.fit

    def counting_fit(config, resume=False, **kwargs):
        calls.append((Path(config.out).name, resume))
        return real_fit(config, resume=resume, **kwargs)

    monkeypatch.setattr(sweep, "fit", counting_fit)
    code, out, err = sweep_cli(*argv[1:])
    assert code == 0, err
    # The interrupted run resumes (queued again after the two that never started), the finished one is not trained.
    assert sorted(calls) == sorted([(GRID_NAMES[1], True), (GRID_NAMES[2], False), (GRID_NAMES[3], False)])
    assert "was left running by a process that has ended; it is queued again" in out
    assert (first / "last.pt").read_bytes() == finished_bytes
    assert (first / "last.pt").stat().st_mtime_ns == finished_mtime
    # Resumed, not restarted: a second session in the same run, which trained only epoch 2.
    assert sessions(second) == 2 and sessions(first) == 1
    assert [row["epoch"] for row in load_checkpoint(second / "last.pt")["metrics"]] == [1, 2]
    assert "Resuming from epoch 1 of 2" in out
    for name, trials in trials_by_run(storage, "s").items():
        assert [t.state.name for t in trials].count("COMPLETE") == 1, name
    assert "4 of 4 runs finished" in out


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "images")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    argv = [sys.executable, "-m", "excite.cli", "sweep", "--data", str(data), *MODELS, "--seeds", "2", "--epochs", "1",
            *TINY, "--out", str(tmp_path / "s"), "--storage", storage]
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())
               for _ in range(2)]
    results = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, err) in zip(workers, results):
        assert worker.returncode == 0, err
    for name in GRID_NAMES:
        assert sessions(tmp_path / "s" / name) == 1, name  # trained once, by one process
    trials = trials_by_run(storage, "s")
    assert sorted(trials) == sorted(GRID_NAMES)
    assert all([t.state.name for t in trials[name]] == ["COMPLETE"] for name in GRID_NAMES), trials
    assert {t.user_attrs["pid"] for name in GRID_NAMES for t in trials[name]} <= {w.pid for w in workers}


def test_search_tunes_an_option(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "images")
    code, out, err = sweep_cli("--data", str(data), "--model", "resnet20_cifar", "--epochs", "1", *TINY,
                               "--search", "lr=0.01:0.2:log", "--trials", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        config = json.loads((tmp_path / "s" / f"trial{trial.number:03d}" / "config.json").read_text())
        assert 0.01 <= trial.params["lr"] <= 0.2 and config["lr"] == trial.params["lr"] and config["seed"] == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    best = max(study.trials, key=lambda t: t.value)
    assert summary["variants"][0]["values"] == {"trial": f"trial{best.number:03d}", "lr": best.params["lr"]}
    assert summary["comparisons"] == [] and "2 of 2 runs finished" in out
