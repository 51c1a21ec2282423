"""``excite sweep``: many ordinary run directories trained from one command, as one Optuna study, and what
they say (:mod:`excite.experiments.stats`).

A sweep directory holds ``sweep.json`` (the options, the axes and every run of the grid), one run directory
per grid point (written by :func:`excite.train.fit.fit`, as ``excite train --out`` would), ``study.db`` (the
Optuna study, unless ``--storage`` names another database) and ``summary.json`` / ``summary.md``.

Each grid point is a trial of the study, enqueued once as a WAITING trial; each process takes the next one
(``study.ask()`` moves one WAITING trial to RUNNING atomically in the database), trains it and tells the study
its best validation accuracy. Two lock files (:func:`excite.io.exclusive_lock`, which the OS drops when a process
ends, however it ends) make every point train exactly once among processes sharing the sweep directory:

- ``.queue.lock`` is held while a process enqueues, or takes a trial: the queue cannot be filled twice, and no
  one judges a trial abandoned while its process is between taking it and claiming it;
- ``.claims/<run>.lock`` is held by the process training that point, from taking its trial until it has told
  the study: a RUNNING trial whose claim is free belongs to a process that is gone. It is failed and its point
  enqueued again, and only the holder of a claim trains the point or tells the study it is complete, after
  checking that no other trial has.

A point whose run directory holds a finished run (``last.pt`` at its last epoch) is told complete from it
without training; one with a ``last.pt`` short of it resumes from there. So the same command, run again after
a kill, continues the sweep, and run on several machines (the sweep directory on a file system they share, and
``--storage`` a database they all reach), shares it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from excite.errors import ExciteError, RunInterrupted, UnknownModelError
from excite.experiments import stats
from excite.experiments.grid import (
    OPERATIONAL,
    SweepPlan,
    default_sweep_dir,
    describe_plan,
    fingerprint,
    grid_configs,
    grid_points,
    plan_from_args,
    run_config,
)
from excite.io import LockHeld, atomic_write_json, atomic_write_text, exclusive_lock
from excite.train.checkpoint import load_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit, resume_config

SWEEP_FILE = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
QUEUE_LOCK = ".queue.lock"
CLAIMS = ".claims"
OPTUNA_MISSING = "excite sweep needs Optuna: pip install 'excite[sweep]'"
# How long a process waits for another to finish with the queue: it holds it for a few database writes, or to
# enqueue a whole grid (milliseconds per point).
QUEUE_WAIT_S = 600
SEARCH_RUN = re.compile(r"trial\d+(-seed\d+)?")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ExciteError(OPTUNA_MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # excite says what happens, in its own lines
    return optuna


def main_sweep(args: argparse.Namespace) -> None:
    """``excite sweep``: train the sweep the options describe (or only summarise one: ``--report-only DIR``)."""
    if args.report_only:
        ignored = ("report_only", "command", "func", "debug")
        given = sorted(k for k, v in vars(args).items() if v is not None and k not in ignored)
        if given:
            raise ExciteError(f"--report-only DIR takes no other options (got --{given[0].replace('_', '-')}): it "
                              "summarises the sweep as it was run")
        summary = report(args.report_only)
        print(stats.format_text(summary, title=f"Sweep {args.report_only}: "))
        return
    run_sweep(plan_from_args(args), out=args.out, storage=args.storage)


def run_sweep(plan: SweepPlan, out: str | Path | None = None, storage: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Train every run of ``plan`` not yet trained (in ``out``, default :func:`default_sweep_dir`) and return the
    summary (see :func:`report`), which it also prints. ``storage`` is an Optuna database URL (default
    ``sqlite:///<out>/study.db``); processes given the same one share the sweep. A run that fails is one line,
    and the others go on; an ExciteError at the end names it (the same command retries it)."""
    optuna = _optuna()
    sweep_dir = Path(out) if out is not None else default_sweep_dir(plan)
    configs = {} if plan.search else grid_configs(plan, sweep_dir)  # every run validated before any trains
    _check_models(configs.values() or [run_config(plan, {r.name: r.low for r in plan.search}, plan.seeds[0], "-")])
    url = storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / CLAIMS).mkdir(exist_ok=True)
    points = {p.name: _params(plan, p.values, p.seed) for p in grid_points(plan)} if not plan.search else {}
    with _queue_lock(sweep_dir):
        _write_sweep_file(sweep_dir, plan, url)
        study = _open_study(optuna, url, sweep_dir.name, fingerprint(plan))
        _requeue(optuna, study, sweep_dir, points, log, everything=True)
    what = (f"{len(points)} runs" if points else f"{plan.trials} trials of {', '.join(r.name for r in plan.search)}")
    log(f"Sweep {sweep_dir}: {what}, study {study.study_name!r} in {_public(url)}")

    operational = {k: plan.fixed.get(k) for k in OPERATIONAL}
    failures: list[tuple[str, str]] = []
    while True:
        with ExitStack() as held:  # the claim on the trial's runs, until the study is told
            trial = _take_trial(optuna, study, plan, sweep_dir, points, held, log)
            if trial is None:
                break
            unit = trial.user_attrs["run"]
            if plan.search:
                values = {r.name: (trial.suggest_int if r.integer else trial.suggest_float)(r.name, r.low, r.high,
                                                                                            log=r.log)
                          for r in plan.search}
                names = [unit] if len(plan.seeds) == 1 else [f"{unit}-seed{s}" for s in plan.seeds]
                runs = [(n, lambda n=n, s=s: run_config(plan, values, s, sweep_dir / n, n))
                        for n, s in zip(names, plan.seeds)]
            else:
                for name, value in points[unit].items():  # the trial's parameters, as Optuna shows them
                    trial.suggest_categorical(name, _choices(plan, name))
                runs = [(unit, lambda: configs[unit])]
            error = _run_trial(optuna, study, trial, runs, sweep_dir, operational, log)
            if error:
                failures.append((unit, error))

    summary = report(sweep_dir)
    log(stats.format_text(summary, title=f"Sweep {sweep_dir}: "))
    if failures:
        name, error = failures[0]
        more = f" (and {len(failures) - 1} more; see {sweep_dir / SUMMARY_MD})" if len(failures) > 1 else ""
        raise ExciteError(f"run {name} failed: {error}{more}; fix it and run the same command again to retry")
    return summary


def _check_models(configs) -> None:
    """Build each distinct model of the sweep on the meta device (no memory, no time): a bad --model or
    --model-arg is one line before anything trains, not a failure of every run that has it."""
    import torch

    from excite.models import create_model

    seen = set()
    for config in configs:
        key = json.dumps([config.model, config.model_kwargs], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            with torch.device("meta"):
                create_model(config.model, **config.model_kwargs)
        except UnknownModelError as e:
            raise ExciteError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise ExciteError(f"cannot build {config.model} with --model-arg values {config.model_kwargs} ({e}); "
                              "fix or drop those --model-arg options") from None
        except RuntimeError:  # a model that cannot be built on the meta device: fit will say what is wrong, if anything
            pass


def _params(plan: SweepPlan, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """A grid point as Optuna trial parameters: each axis's value (lists as text, as categorical choices must be
    plain values) and the seed."""
    return {**{name: _choice(value) for name, value in values.items()}, "seed": seed}


def _choice(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else stats.show(value)


def _choices(plan: SweepPlan, name: str) -> list:
    if name == "seed":
        return list(plan.seeds)
    return [_choice(v) for v in next(a.values for a in plan.axes if a.name == name)]


@contextmanager
def _queue_lock(sweep_dir: Path) -> Iterator[None]:
    deadline = time.monotonic() + QUEUE_WAIT_S
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(exclusive_lock(sweep_dir / QUEUE_LOCK))
                break
            except LockHeld as e:
                if time.monotonic() > deadline:
                    raise ExciteError(f"{sweep_dir} has been held by process {e.pid} for {QUEUE_WAIT_S} s; is it "
                                      "stuck? Stop it, then run the sweep again") from None
                time.sleep(0.05)
        yield


def _claim_path(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / CLAIMS / f"{name}.lock"


def _is_claimed(sweep_dir: Path, name: str) -> bool:
    """Whether a live process holds the claim on ``name``."""
    try:
        with exclusive_lock(_claim_path(sweep_dir, name)):
            return False
    except LockHeld:
        return True


def _public(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)  # a database password stays out of files and logs


def _write_sweep_file(sweep_dir: Path, plan: SweepPlan, url: str) -> None:
    """Write sweep.json, or check that the sweep already in ``sweep_dir`` has the same options."""
    path = sweep_dir / SWEEP_FILE
    described = describe_plan(plan)
    if path.is_file():
        before = _read_sweep_file(sweep_dir)["plan"]
        if before != described:
            was, now = before.get("fixed", {}), described["fixed"]
            differ = ["--model-arg" if k == "model_kwargs" else f"--{k.replace('_', '-')}"
                      for k in {**was, **now} if was.get(k) != now.get(k)]
            differ += [k for k in described if k != "fixed" and before.get(k) != described[k]]
            raise ExciteError(f"{sweep_dir} holds a sweep of other options ({', '.join(differ)} differ; see its "
                              f"{SWEEP_FILE}): give the same options to continue it, or another --out")
    runs = [] if plan.search else [{"name": p.name, "values": p.values, "seed": p.seed} for p in grid_points(plan)]
    atomic_write_json(path, json.loads(json.dumps({
        "format": "excite-sweep", "version": 1, "mode": "search" if plan.search else "grid",
        "study_name": sweep_dir.name, "storage": _public(url), "trials": plan.trials, "plan": described,
        "runs": runs})))


def _read_sweep_file(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExciteError(f"{sweep_dir} is not a sweep directory (it has no {SWEEP_FILE})") from None
    except (OSError, ValueError) as e:
        raise ExciteError(f"{path} cannot be read ({e}); run the sweep's command again to rewrite it") from None
    if not isinstance(record, dict) or record.get("format") != "excite-sweep":
        raise ExciteError(f"{path} is not an excite sweep file")
    return record


def _open_study(optuna, url: str, name: str, sweep_fingerprint: str):
    """The sweep's study in ``url``, created by the first process that asks (the others load it)."""
    import sqlalchemy.exc

    try:
        # SQLite lets one process write at a time; the others wait for it (up to a minute) instead of failing.
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize")
    except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExciteError(f"--storage {_public(url)} cannot be opened ({reason}); give an Optuna database URL such as "
                          "sqlite:///study.db or postgresql://user:password@host/db") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", sweep_fingerprint)
    elif stored != sweep_fingerprint:
        raise ExciteError(f"the study {name!r} in {_public(url)} belongs to a sweep of other options; give another "
                          "--out (the study is named after the sweep directory) or another --storage")
    return study


def _requeue(optuna, study, sweep_dir: Path, points: dict[str, dict], log: Callable[[str], None],
             everything: bool) -> int:
    """Fail the RUNNING trials whose process is gone and enqueue their runs again; with ``everything``, also
    enqueue each grid point in ``points`` (name -> parameters) that has no trial waiting, running or complete,
    and each --search trial that ended without a result of its own (interrupted). Needs the queue lock; returns
    how many trials it enqueued."""
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    live, again = set(), {}
    for trial in trials:
        name = trial.user_attrs.get("run")
        if trial.state != state.RUNNING:
            continue
        if name is not None and _is_claimed(sweep_dir, name):
            live.add(name)
            continue
        study.tell(trial.number, state=state.FAIL, skip_if_finished=True)
        if name is not None:
            log(f"Trial {trial.number} ({name}) was left running by a process that has ended; it is queued again")
            again[name] = points.get(name, trial.params)
    covered = live | {t.user_attrs.get("run") for t in trials if t.state in (state.COMPLETE, state.WAITING)}
    if everything:
        for trial in trials:
            if trial.state == state.FAIL and trial.user_attrs.get("interrupted") and not points:
                again.setdefault(trial.user_attrs["run"], trial.params)
        for name, params in points.items():
            again.setdefault(name, params)
    queued = 0
    for name, params in again.items():
        if name not in covered:
            study.enqueue_trial(params, user_attrs={"run": name})
            covered.add(name)
            queued += 1
    return queued


def _trials_counted(optuna, study) -> int:
    """The --search trials that count towards --trials: all but those failed for another reason than their
    options (interrupted, abandoned, or a duplicate), whose runs are queued again."""
    state = optuna.trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (state.COMPLETE, state.RUNNING, state.WAITING)
               or (t.state == state.FAIL and "error" in t.user_attrs))


def _take_trial(optuna, study, plan: SweepPlan, sweep_dir: Path, points: dict, held: ExitStack,
                log: Callable[[str], None]):
    """The next trial for this process, claimed in ``held``; None when there is nothing left to train."""
    state = optuna.trial.TrialState
    while True:
        with _queue_lock(sweep_dir):
            waiting = study.get_trials(deepcopy=False, states=(state.WAITING,))
            if not waiting and _requeue(optuna, study, sweep_dir, points, log, everything=False):
                waiting = study.get_trials(deepcopy=False, states=(state.WAITING,))
            if waiting:
                trial = study.ask()  # takes the first WAITING trial
            elif plan.search and _trials_counted(optuna, study) < plan.trials:
                trial = study.ask()
                trial.set_user_attr("run", f"trial{trial.number:03d}")
            else:
                return None
            name = trial.user_attrs.get("run")
            if name is None:  # a fresh trial: a process outside this sweep directory took the last waiting one
                study.tell(trial, state=state.FAIL)
                continue
            try:
                held.enter_context(exclusive_lock(_claim_path(sweep_dir, name)))
            except LockHeld:  # its run is being trained by another process: this trial is a duplicate
                trial.set_user_attr("duplicate", True)
                study.tell(trial, state=state.FAIL)
                continue
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        return trial


def _completed_elsewhere(optuna, study, name: str, number: int) -> bool:
    return any(t.user_attrs.get("run") == name and t.number != number
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _run_trial(optuna, study, trial, runs: list[tuple[str, Callable[[], TrainConfig]]], sweep_dir: Path,
               operational: dict, log: Callable[[str], None]) -> str | None:
    """Train (or resume, or read back) the trial's runs and tell the study; returns the error that failed it."""
    state = optuna.trial.TrialState
    unit = trial.user_attrs["run"]
    if _completed_elsewhere(optuna, study, unit, trial.number):  # enqueued twice by processes that did not share
        trial.set_user_attr("duplicate", True)                   # the queue lock: the other trial has it
        study.tell(trial, state=state.FAIL)
        return None
    outcomes = []
    try:
        for name, config in runs:
            outcomes.append(_train_run(sweep_dir / name, config, operational,
                                       lambda line, name=name: log(f"[{name}] {line}")))
    except RunInterrupted as e:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=state.FAIL, skip_if_finished=True)
        stopped = RunInterrupted(f"{unit}: {e}; or run the same excite sweep command again to continue the sweep")
        stopped.exit_code = e.exit_code
        raise stopped from None
    except ExciteError as e:
        log(f"[{unit}] failed: {e}")
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=state.FAIL, skip_if_finished=True)
        return str(e)
    except BaseException:  # Ctrl-C outside a run, or a bug: the run is queued again on the next start
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=state.FAIL, skip_if_finished=True)
        raise
    best = [o["best_val_acc"] for o in outcomes]
    trial.set_user_attr("run_dirs", [o["run_dir"] for o in outcomes])
    trial.set_user_attr("best_val_acc", sum(best) / len(best))
    trial.set_user_attr("final_val_acc", sum(o["final_val_acc"] for o in outcomes) / len(outcomes))
    trial.set_user_attr("outcomes", outcomes)
    if _completed_elsewhere(optuna, study, unit, trial.number):
        trial.set_user_attr("duplicate", True)
        study.tell(trial, state=state.FAIL)
    else:
        study.tell(trial, sum(best) / len(best))
    return None


def _train_run(run_dir: Path, config: Callable[[], TrainConfig], operational: dict,
               log: Callable[[str], None]) -> dict:
    """Bring one run to its last epoch: read back a finished run, resume a started one from its last.pt, or train
    a new one; returns its results for the trial's user attributes."""
    last = run_dir / "last.pt"
    if last.is_file():
        checkpoint = load_checkpoint(last)
        if checkpoint["epoch"] >= checkpoint["config"]["epochs"]:
            return _outcome(run_dir, checkpoint["best_acc"], checkpoint["best_epoch"], checkpoint["metrics"],
                            "already finished")
        log(f"Resuming from epoch {checkpoint['epoch']} of {checkpoint['config']['epochs']}")
        result = fit(resume_config(run_dir, **operational), resume=True, log=log)
        return _outcome(run_dir, result.best_acc, result.best_epoch, result.history, "resumed")
    result = fit(config(), log=log)
    return _outcome(run_dir, result.best_acc, result.best_epoch, result.history, "trained")


def _outcome(run_dir: Path, best_acc: float, best_epoch: int, history: list[dict], how: str) -> dict:
    final = history[-1] if history else {}
    return {"run_dir": str(run_dir), "best_val_acc": best_acc, "best_epoch": best_epoch,
            "final_val_acc": final.get("val_acc"), "final_val_loss": final.get("val_loss"),
            "final_train_acc": final.get("train_acc"), "epochs": final.get("epoch"), "session": how}


def report(sweep_dir: str | Path) -> dict:
    """Summarise the sweep in ``sweep_dir`` from its run directories, whether or not it is finished: write
    ``summary.json`` and ``summary.md`` there and return the summary (see :func:`excite.experiments.stats.summarize`).
    Needs neither Optuna nor the study."""
    sweep_dir = Path(sweep_dir)
    record = _read_sweep_file(sweep_dir)
    plan = record["plan"]
    if record["mode"] == "grid":
        axes = [(a["name"], a["values"]) for a in plan["axes"]]
        runs = [read_run(sweep_dir / r["name"], r["values"], r["seed"]) for r in record["runs"]]
        summary = stats.summarize(runs, axes)
    else:
        names = [r["name"] for r in plan["search"]]
        runs = []
        for run_dir in sorted(p for p in sweep_dir.iterdir() if SEARCH_RUN.fullmatch(p.name) and p.is_dir()):
            config = _read_json(run_dir / "config.json") or {}
            values = {"trial": run_dir.name.split("-")[0], **{n: config.get(n) for n in names}}
            runs.append(read_run(run_dir, values, config.get("seed")))
        summary = stats.summarize(runs, [("trial", []), *((n, []) for n in names)], compare=False)
        summary["variants"].sort(key=lambda v: -(v["best"]["mean"] or 0))  # the best trial first
    summary["sweep"] = str(sweep_dir)
    atomic_write_json(sweep_dir / SUMMARY_JSON, summary)
    atomic_write_text(sweep_dir / SUMMARY_MD, stats.format_markdown(summary, title=f"Sweep {sweep_dir.name}"))
    return summary


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run(run_dir: Path, values: dict[str, Any], seed: int) -> dict:
    """One run as :mod:`excite.experiments.stats` takes it, from its config.json, metrics.jsonl and model.json.

    Finished means that metrics.jsonl has a row for the config's last epoch: the rows are written just before
    last.pt, so a run killed between the two counts as finished here and trains its last epoch again when resumed.
    """
    config = _read_json(run_dir / "config.json") or {}
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and "val_acc" in row:
                rows.append(row)
    epochs = config.get("epochs")
    run = {"run": run_dir.name, "values": values, "seed": seed, "epochs": epochs,
           "epochs_done": rows[-1]["epoch"] if rows else 0,
           "finished": bool(rows) and isinstance(epochs, int) and rows[-1]["epoch"] >= epochs}
    if rows:
        best = max(rows, key=lambda row: row["val_acc"])  # the first of equals, as fit keeps it
        run.update(best_val_acc=best["val_acc"], best_epoch=best["epoch"], final_val_acc=rows[-1]["val_acc"],
                   epoch_seconds=stats.mean_std(r["epoch_seconds"] for r in rows if "epoch_seconds" in r).mean)
    run["params"] = (_read_json(run_dir / "model.json") or {}).get("total_params")
    return run

