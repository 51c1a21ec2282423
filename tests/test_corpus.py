"""The adversarial corpus: what a new user, a crafted file or a hostile system does to excite, and what must
happen. Each case is a row: how to set it up, the command, the exit status, a fragment of the one line it must
print, and the files that must come out unchanged (or a check of what was written).

Every command runs in this process through ``excite.cli.main`` on a tiny ResNet-20 and a generated folder of
36 16-pixel images, so a case takes about a second. ``python tests/test_corpus.py`` runs the corpus outside
pytest and prints the census (handled, tracebacks, data lost, wrong), also against an older excite on
``PYTHONPATH``, to compare versions.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_image_folder  # noqa: E402

TINY = ["--model", "resnet20_cifar", "--model-arg", "widths=[4,8,8]", "--epochs", "1", "--batch-size", "8",
        "--img-size", "16", "--lr", "0.05", "--seed", "3"]


def train(case: Path, *extra: str, data: str = "data", out: str = "run") -> list[str]:
    return ["train", *TINY, "--data", str(case / data), "--out", str(case / out), *extra]


def resume(case: Path, *extra: str) -> list[str]:
    return ["train", "--resume", str(case / "run"), "--epochs", "2", *extra]


def predict(case: Path, checkpoint: str = "run", *inputs: str) -> list[str]:
    return ["predict", "--checkpoint", str(case / checkpoint), *(inputs or [str(case / "data" / "red")])]


@dataclass
class Case:
    """One row of the corpus."""

    name: str
    command: Callable[[Path], list[str]]
    status: int
    message: str  # in the single stderr line when status != 0, else anywhere in stdout + stderr
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    unchanged: tuple[str, ...] = ()  # paths under the case folder whose bytes must not change
    check: Callable[[Path], None] | None = None  # more conditions on what the command left behind
    needs_run: bool = False  # start from a finished one-epoch run in case/run
    marks: tuple = field(default_factory=tuple)


# ------------------------------------------------------------------------------ set-ups

def write_file(relative: str, content: bytes | str) -> Callable:
    def setup(case: Path, mp) -> None:
        path = case / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def edit_checkpoint(name: str, change: Callable[[dict], None]) -> Callable:
    """Rewrite the run's checkpoint ``name`` after ``change``, as a hand-edited or foreign file would be."""
    def setup(case: Path, mp) -> None:
        path = case / "run" / name
        state = torch.load(path, weights_only=True)
        change(state)
        state.pop("checksum", None)  # an edited file without its checksum: the structure checks must catch it
        torch.save(state, path)
    return setup


def flip_bytes(name: str, count: int = 4000) -> Callable:
    """Flip ``count`` bytes in the middle of the largest stretch of tensor data of ``name``."""
    def setup(case: Path, mp) -> None:
        path = case / "run" / name
        data = bytearray(path.read_bytes())
        start = len(data) // 3
        for i in range(start, min(start + count, len(data) - 200)):
            data[i] ^= 0x55
        path.write_bytes(bytes(data))
    return setup


def symlink(relative: str, target: str) -> Callable:
    def setup(case: Path, mp) -> None:
        (case / relative).symlink_to(target)
    return setup


def split_folder(case: Path, mp) -> None:
    shutil.rmtree(case / "data")
    write_image_folder(case / "data" / "train", per_class=10)
    write_image_folder(case / "data" / "test", per_class=4, seed=1)


def bomb(case: Path, mp) -> None:
    # A 20000 x 20000 one-bit PNG: 50 KB on disk, 1.2 GB as RGB pixels.
    Image.new("1", (20000, 20000)).save(case / "data" / "red" / "bomb.png", optimize=True)


def unwritable_cache(case: Path, mp) -> None:
    blocker = case / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    mp.setenv("EXCITE_CACHE_DIR", str(blocker / "cache"))


def full_disk_at(name: str) -> Callable:
    """Make every write of a file called ``name`` fail as a full disk does, half-way through."""
    def setup(case: Path, mp) -> None:
        real = os.fsync

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)

        mp.setattr(os, "fsync", fsync)
    return setup


def unreadable_class_folder(case: Path, mp) -> None:
    real = os.scandir
    target = str(case / "data" / "green")

    def scandir(path="."):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
        return real(path)

    mp.setattr(os, "scandir", scandir)


def both(*setups: Callable) -> Callable:
    def setup(case: Path, mp) -> None:
        for step in setups:
            step(case, mp)
    return setup


# ------------------------------------------------------------------------------ checks

def finite_checkpoints(case: Path) -> None:
    for path in (case / "run").glob("*.pt"):
        state = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path


def created_nothing(case: Path) -> None:
    assert not (case / "run").exists(), sorted(p.name for p in (case / "run").iterdir())


def trained_on(train_images: int, classes: list[str]) -> Callable:
    def check(case: Path) -> None:
        state = torch.load(case / "run" / "last.pt", weights_only=True)
        assert state["classes"] == classes
        assert sum(len(part) for part in state["split"].values()) == train_images, state["split"]
    return check


def no_lock_left(case: Path) -> None:
    assert not (case / "run" / ".lock").exists()


def skipped_listed(fragment: str) -> Callable:
    def check(case: Path) -> None:
        from excite.data import parse_skipped_lines

        listed = parse_skipped_lines((case / "run" / "skipped_files.txt").read_text())
        assert any(fragment in path for path in listed), listed
    return check


def resumed_to(epoch: int) -> Callable:
    def check(case: Path) -> None:
        assert torch.load(case / "run" / "last.pt", weights_only=True)["epoch"] == epoch
    return check


# ------------------------------------------------------------------------------ the corpus

def _config_file(content: str) -> Callable:
    return write_file("options.json", content)


def _with_config(case: Path) -> list[str]:
    return ["train", "--config", str(case / "options.json"), "--data", str(case / "data"), "--out", str(case / "run")]


CASES = [
    # Option values that cannot work: one line, before anything is created.
    Case("lr-inf", lambda c: train(c, "--lr", "inf"), 2, "--lr must be a finite number", check=created_nothing),
    Case("weight-decay-inf", lambda c: train(c, "--weight-decay", "inf"), 2, "--weight-decay must be a finite"),
    Case("warmup-inf", lambda c: train(c, "--warmup-epochs", "inf"), 2, "--warmup-epochs must be a finite"),
    Case("gamma-negative", lambda c: train(c, "--sched", "step", "--gamma", "-0.5"), 2, "--gamma must be positive"),
    Case("seed-negative", lambda c: train(c, "--seed", "-1"), 2, "--seed must be a whole number from 0"),
    Case("seed-beyond-64-bits", lambda c: train(c, "--seed", str(2**70)), 2, "--seed must be a whole number"),
    Case("momentum-negative", lambda c: train(c, "--momentum", "-1"), 2, "--momentum must be in [0, 1)"),
    Case("nesterov-without-momentum", lambda c: train(c, "--nesterov", "--momentum", "0"), 2,
         "--nesterov needs a positive --momentum"),
    Case("nesterov-with-adam", lambda c: train(c, "--opt", "adam", "--nesterov"), 2, "--nesterov applies to --opt sgd"),
    Case("batch-size-1-batchnorm", lambda c: train(c, "--batch-size", "1"), 2, "batches of one image"),
    Case("growth-rate-negative", lambda c: train(c, "--model", "densenet_bc_100", "--model-arg", "growth_rate=-2"), 2,
         "growth_rate"),
    Case("drop-rate-negative", lambda c: train(c, "--model-arg", "drop_rate=-3"), 2, "drop_rate"),
    Case("block-misspelt", lambda c: train(c, "--model", "resnet18", "--model-arg", "block=basik"), 2, "basik",
         check=no_lock_left),
    Case("model-misspelt", lambda c: train(c, "--model", "resnet20_cifr"), 2,
         "error: unknown model 'resnet20_cifr': did you mean resnet20_cifar"),
    Case("in-chans-1", lambda c: train(c, "--model-arg", "in_chans=1"), 2, "in_chans=1 cannot train"),
    Case("device-cuda-1", lambda c: train(c, "--device", "cuda:1"), 2, "no CUDA GPU is visible"),
    Case("device-unknown", lambda c: train(c, "--device", "gpu"), 2, "--device 'gpu' is not valid"),
    # Config files a hand can get wrong.
    Case("config-epochs-word", _with_config, 2, "--epochs must be a whole number, got 'ten'",
         setup=_config_file('{"epochs": "ten"}'), check=created_nothing),
    Case("config-lr-string", _with_config, 2, "--lr must be a number, got '0.1'", setup=_config_file('{"lr": "0.1"}')),
    Case("config-top-level-list", _with_config, 2, "not a table of options", setup=_config_file("[1, 2]")),
    Case("config-epochs-fraction", _with_config, 2, "--epochs must be a whole number, got 1.5",
         setup=_config_file('{"epochs": 1.5}'), check=created_nothing),
    Case("config-hflip-word", _with_config, 2, "--hflip must be true or false", setup=_config_file('{"hflip": "no"}'),
         check=created_nothing),
    Case("config-not-json", _with_config, 2, "cannot parse config file", setup=_config_file('{"epochs": 3')),
    # Training that diverges: stopped, and no checkpoint holds NaN or infinity.
    Case("lr-1e6-every-step", lambda c: train(c, "--lr", "1e6", "--checkpoint-minutes", "0"), 2, "NaN or infinite",
         check=finite_checkpoints),
    Case("lr-1e5", lambda c: train(c, "--lr", "1e5", "--epochs", "3"), 2, "became", check=finite_checkpoints),
    # Folders that mislead.
    Case("symlink-loop", lambda c: train(c), 0, "symbolic link", setup=symlink("data/red/loop", ".."),
         check=trained_on(36, ["blue", "green", "red"])),
    Case("train-test-folders", lambda c: train(c), 0, "training on train/, validating on test/", setup=split_folder,
         check=trained_on(42, ["blue", "green", "red"])),
    Case("train-test-folders-as-classes", lambda c: train(c, "--data-layout", "classes"), 0, "Training",
         setup=split_folder, check=trained_on(42, ["test", "train"])),
    Case("val-dir-is-data", lambda c: train(c, "--val-dir", str(c / "data")), 2, "--val-dir"),
    Case("decompression-bomb", lambda c: train(c), 0, "Skipped 1 unreadable", setup=bomb,
         check=skipped_listed("bomb.png")),
    Case("unreadable-class-folder", lambda c: train(c), 2, "green", setup=unreadable_class_folder),
    Case("newline-in-file-name", lambda c: train(c), 0, "Skipped 1 unreadable",
         setup=write_file("data/red/bad:\nname.png", b"not a png"), check=skipped_listed("bad:\nname.png")),
    Case("unwritable-scan-cache", lambda c: train(c), 0, "Training", setup=unwritable_cache,
         check=resumed_to(1)),
    Case("own-tmp-files-in-out", lambda c: train(c), 0, "Training",
         setup=both(write_file("run/notes.tmp", "mine"), write_file("run/.draft.tmp", "mine too")),
         unchanged=("run/notes.tmp", "run/.draft.tmp")),
    # Hostile or failing systems.
    Case("lock-is-a-symlink", lambda c: resume(c), 2, ".lock", needs_run=True,
         setup=both(write_file("bashrc", "export PATH=/usr/bin\n"), symlink("run/.lock", "../bashrc")),
         unchanged=("bashrc", "run/last.pt")),
    Case("full-disk-last-pt", lambda c: train(c, "--epochs", "2"), 2, "last.pt", setup=full_disk_at("last.pt")),
    Case("full-disk-best-weights", lambda c: train(c), 2, "best.safetensors",
         setup=full_disk_at("best.safetensors")),
    # Damaged and foreign files.
    Case("flipped-bytes-best-weights", lambda c: predict(c), 2, "damaged", needs_run=True,
         setup=flip_bytes("best.safetensors")),
    Case("flipped-bytes-last-pt", lambda c: resume(c), 2, "damaged", needs_run=True, setup=flip_bytes("last.pt"),
         unchanged=("run/metrics.jsonl", "run/best.safetensors")),
    Case("foreign-last-pt", lambda c: resume(c), 2, "copied from another run directory", needs_run=True,
         setup=lambda c, mp: shutil.copy(c / "other" / "last.pt", c / "run" / "last.pt"),
         unchanged=("run/config.json", "run/metrics.jsonl", "run/best.safetensors")),
    Case("checkpoint-fewer-classes", lambda c: predict(c, "run/last.pt"), 2, "class", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s.update(classes=["blue", "green"]))),
    Case("checkpoint-img-size-string", lambda c: predict(c, "run/last.pt"), 2, "img_size", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s.update(img_size="big"))),
    Case("checkpoint-no-model-kwargs", lambda c: predict(c, "run/last.pt"), 2, "model_kwargs", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s.pop("model_kwargs"))),
    Case("checkpoint-no-metrics", lambda c: resume(c), 2, "metrics", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s.pop("metrics"))),
    Case("checkpoint-model-does-not-fit", lambda c: resume(c), 2, "last.pt", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s["model"].pop(next(iter(s["model"]))))),
    Case("checkpoint-optimizer-does-not-fit", lambda c: resume(c), 2, "optimizer", needs_run=True,
         setup=edit_checkpoint("last.pt", lambda s: s["optimizer"]["param_groups"].pop())),
    Case("pretrained-loads-nothing", lambda c: train(c, "--pretrained", str(c / "unrelated.safetensors")), 2,
         "unrelated.safetensors",
         setup=lambda c, mp: __import__("safetensors.torch").torch.save_file(
             {"encoder.weight": torch.zeros(3, 3)}, c / "unrelated.safetensors"), check=created_nothing),
    Case("pretrained-int8", lambda c: train(c, "--pretrained", str(c / "int8.pt"), out="new"), 2, "int8",
         needs_run=True,
         setup=lambda c, mp: torch.save({k: v.to(torch.int8) if v.is_floating_point() else v for k, v in
                                         torch.load(c / "run" / "last.pt", weights_only=True)["model"].items()},
                                        c / "int8.pt"),
         check=lambda c: None),
    # Bookkeeping files a crash or an editor damaged: the resume goes on, the files are rebuilt.
    Case("damaged-environment-json", lambda c: resume(c), 0, "Epoch: 2", needs_run=True,
         setup=write_file("run/environment.json", '[{"device": '), check=resumed_to(2)),
    Case("damaged-metrics-jsonl", lambda c: resume(c), 0, "Epoch: 2", needs_run=True,
         setup=write_file("run/metrics.jsonl", '{"epoch": 1, "val_acc"\n[]\n'), check=resumed_to(2)),
    Case("damaged-skipped-files", lambda c: resume(c), 0, "Epoch: 2", needs_run=True,
         setup=write_file("run/skipped_files.txt", b"\xff\xfe\x00garbage"), check=resumed_to(2)),
    # Using a model.
    Case("predict-only-unreadable", lambda c: predict(c, "run", str(c / "junk.png")), 2, "could be read",
         needs_run=True, setup=write_file("junk.png", "not an image")),
    Case("summary-cifar-model-params", lambda c: ["summary", "resnet20_cifar", "--img-size", "32"], 0, "272,474"),
    Case("summary-growth-rate", lambda c: ["summary", "densenet121", "--model-arg", "growth_rate=12",
                                           "--img-size", "64"], 0, "Total params"),
    Case("summary-of-a-run", lambda c: ["summary", str(c / "run")], 0, "Total params", needs_run=True),
]


# ------------------------------------------------------------------------------ running a case

@dataclass
class Outcome:
    status: int | None  # None: an exception escaped main()
    stdout: str
    stderr: str
    changed: list[str]  # protected files whose bytes changed
    check_error: str | None


def _snapshot(case: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    return {name: (case / name).read_bytes() if (case / name).is_file() else None for name in names}


def prepare(case_dir: Path, case: Case, run_template: Callable[[], Path]) -> None:
    write_image_folder(case_dir / "data")
    if case.needs_run:
        shutil.copytree(run_template() / "run", case_dir / "run", symlinks=True)
        shutil.copytree(run_template() / "other", case_dir / "other", symlinks=True)


def run_case(case: Case, case_dir: Path, mp: pytest.MonkeyPatch) -> Outcome:
    from excite.cli import main

    if case.setup is not None:
        case.setup(case_dir, mp)
    before = _snapshot(case_dir, case.unchanged)
    out, err = io.StringIO(), io.StringIO()
    status = None
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(case.command(case_dir))
        except SystemExit as e:  # argparse
            status = e.code
        except BaseException:  # noqa: BLE001 - a traceback is what the census counts
            traceback.print_exc(file=err)
    mp.undo()  # monkeypatched failures end with the command, before the checks read the files
    changed = [name for name, content in _snapshot(case_dir, case.unchanged).items() if content != before[name]]
    check_error = None
    if case.check is not None and status is not None:
        try:
            case.check(case_dir)
        except Exception as e:  # noqa: BLE001
            check_error = f"{type(e).__name__}: {e}"
    # The case folder's path is written out as CASE, so that a fragment can only match what excite said (pytest's
    # folder names hold the case's name).
    printed = [text.replace(str(case_dir), "CASE") for text in (out.getvalue(), err.getvalue())]
    return Outcome(status, *printed, changed, check_error)


def verdict(case: Case, outcome: Outcome) -> str:
    """handled, traceback, data lost (a protected file changed, or a check of the files failed), or wrong."""
    if outcome.status is None:
        return "traceback"
    if outcome.changed or outcome.check_error:
        return "data lost"
    if outcome.status != case.status:
        return "wrong"
    if case.status != 0:
        lines = [line for line in outcome.stderr.splitlines() if not _is_warning(line)]
        if len(lines) != 1 or case.message not in lines[0] or "Traceback" in outcome.stderr:
            return "wrong"
    elif case.message not in outcome.stdout + outcome.stderr:
        return "wrong"
    return "handled"


def _is_warning(line: str) -> bool:
    # Python's warnings print the warning and the source line below it; they may accompany an error.
    return "Warning:" in line or line.startswith("  ")


def _run_template(root: Path) -> Path:
    """A finished one-epoch run (and a second one of another model, for foreign files), trained once."""
    if not (root / "run").exists():
        from excite.cli import main

        write_image_folder(root / "data")
        with redirect_stdout(io.StringIO()):
            assert main(train(root)) == 0
            assert main(train(root, "--model", "se_resnet20_cifar", out="other")) == 0
    return root


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Callable[[], Path]:
    root = tmp_path_factory.mktemp("corpus-template")
    return lambda: _run_template(root)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case: Case, tmp_path, run_template, monkeypatch):
    prepare(tmp_path, case, run_template)
    outcome = run_case(case, tmp_path, monkeypatch)
    assert verdict(case, outcome) == "handled", (outcome.status, outcome.stderr[-3000:], outcome.stdout[-1500:],
                                                 outcome.changed, outcome.check_error)


def census() -> dict[str, list[str]]:
    """Run every case outside pytest; returns the case names by verdict."""
    results: dict[str, list[str]] = {"handled": [], "traceback": [], "data lost": [], "wrong": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EXCITE_CACHE_DIR"] = str(root / "cache")
        template = lambda: _run_template(root / "template")  # noqa: E731
        for i, case in enumerate(CASES):
            case_dir = root / f"{i:02d}"
            case_dir.mkdir()
            try:
                prepare(case_dir, case, template)
                mp = pytest.MonkeyPatch()
                outcome = run_case(case, case_dir, mp)
                result = verdict(case, outcome)
            except Exception:  # noqa: BLE001 - an older excite may not run the set-up at all
                result = "traceback"
            results[result].append(case.name)
            print(f"{result:>10}  {case.name}", flush=True)
    return results


if __name__ == "__main__":
    np.seterr(all="ignore")
    counts = census()
    print(json.dumps({k: len(v) for k, v in counts.items()}, indent=None), f"of {len(CASES)} cases")
