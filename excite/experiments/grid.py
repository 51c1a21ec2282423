"""The grid of an ``excite sweep``: its options, read like ``excite train``'s (a value with commas lists an
axis's values), expanded into named grid points, each a TrainConfig validated before anything runs.

Torch-free, like :mod:`excite.bench_options`: the CLI builds the sweep's parser from this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from excite.cli import _add_train_options, _key_value, _train_overrides
from excite.errors import ExciteError
from excite.train.config import TrainConfig, option_type, read_config_file, resolve_config

#: Options that say where and how fast runs train, not what they train: one value for the whole sweep, and free to
#: differ between the sessions and machines that share it (a resumed run may change them too).
OPERATIONAL = ("device", "workers", "checkpoint_minutes", "progress_seconds")
# excite train options a sweep does not take: it names each run's directory, continues by being run again, and runs
# several trainings at once by being started in several processes.
_NOT_IN_SWEEP = ("--out", "--resume", "--nproc")
DEFAULT_SEEDS = 3  # the fewest that give a paired interval with some width to it (2 degrees of freedom)
DEFAULT_TRIALS = 20
SEARCH_SYNTAX = "KEY=LOW:HIGH[:log]"


class _Definitions:
    """Stands in for an ArgumentParser to collect the definitions of ``excite train``'s options."""

    def __init__(self) -> None:
        self.options: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []
        self._group = ""

    def add_argument_group(self, title: str = "", *args: Any, **kwargs: Any) -> "_Definitions":
        self._group = title
        return self

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        self.options.append((self._group, flags, kwargs))


@dataclass(frozen=True)
class _Option:
    flag: str
    convert: Callable[[str], Any] | None  # the train flag's type (int, float, ...); None: the text itself
    choices: tuple | None


def _train_definitions() -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    found = _Definitions()
    _add_train_options(found)  # type: ignore[arg-type]
    return [(group, flags, kwargs) for group, flags, kwargs in found.options if flags[0] not in _NOT_IN_SWEEP]


def _dest(flags: tuple[str, ...], kwargs: dict[str, Any]) -> str:
    return kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")


def _text_options() -> dict[str, _Option]:
    """The train options a sweep reads as text (all but the switches), by destination."""
    return {_dest(flags, kwargs): _Option(flags[0], kwargs.get("type"), kwargs.get("choices"))
            for _, flags, kwargs in _train_definitions() if kwargs.get("action") is not argparse.BooleanOptionalAction}


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Mount the ``excite sweep`` options on ``parser``: every ``excite train`` option but --out and --resume,
    taken as text so that a value with commas can list an axis's values, and the sweep's own options."""
    parser.description = ("Train every combination of the options given with several values (--model a,b, "
                          "--model-arg growth_rate=12,24, --lr 0.05,0.1) for each seed, as ordinary run directories in "
                          "one sweep directory, then say which differences are larger than seed noise.")
    groups: dict[str, Any] = {}
    for group, flags, kwargs in _train_definitions():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} (as for excite train; A,B,... for several values)")
        if kwargs.get("action") is not argparse.BooleanOptionalAction:  # a switch has one value for the sweep
            choices = kwargs.get("choices")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("type", "choices")}
            if "metavar" not in kwargs and _dest(flags, kwargs) != "config":
                kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else "A[,B...]"
        groups[group].add_argument(*flags, **kwargs)
    g = parser.add_argument_group("sweep")
    g.add_argument("--seeds", type=int, metavar="N",
                   help=f"train each variant with seeds 0..N-1 (default {DEFAULT_SEEDS}; or list them: --seed 0,1,2)")
    g.add_argument("--out", help="the sweep directory (default sweeps/<data>-<hash of the options>)")
    g.add_argument("--storage", metavar="URL",
                   help="Optuna database URL; processes given the same one share the sweep, each taking the next run "
                        "(default sqlite:///<sweep dir>/study.db)")
    g.add_argument("--search", action="append", metavar=SEARCH_SYNTAX,
                   help="tune a numeric option with Optuna's sampler instead of a grid, e.g. lr=0.01:0.3:log "
                        "(repeatable)")
    g.add_argument("--trials", type=int, help=f"how many trials --search runs (default {DEFAULT_TRIALS})")
    g.add_argument("--report-only", metavar="DIR", help="summarise the sweep in DIR again, without training")


@dataclass(frozen=True)
class Axis:
    """An option given several values: a TrainConfig field, or a ``--model-arg`` key when ``model_arg``."""

    name: str
    values: tuple
    model_arg: bool = False


@dataclass(frozen=True)
class SearchRange:
    """A ``--search KEY=LOW:HIGH[:log]``: a numeric TrainConfig field that Optuna's sampler chooses."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass
class SweepPlan:
    """What an ``excite sweep`` command asks for."""

    fixed: dict[str, Any]  # the train options with one value, by TrainConfig field (model_kwargs a dict)
    axes: list[Axis]  # the options that vary, in the order their values appear in run names
    seeds: list[int]
    config_file: str | None = None
    search: list[SearchRange] = field(default_factory=list)
    trials: int | None = None  # how many trials --search runs; None for a grid


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: its directory's name, the value of each axis, its seed."""

    name: str
    values: dict[str, Any]
    seed: int


def split_values(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes: ``"12,24"`` -> ``["12", "24"]``,
    ``"[4,4,4],[6,6,6]"`` -> ``["[4,4,4]", "[6,6,6]"]``."""
    pieces, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:i].strip())
            start = i + 1
    pieces.append(text[start:].strip())
    return pieces


def _pieces(flag: str, text: str) -> list[str]:
    pieces = split_values(text)
    if "" in pieces:
        raise ExciteError(f"{flag} {text!r} has an empty value: separate the values with single commas")
    return pieces


def _convert(option: _Option, text: str) -> Any:
    """One value of a train option, read as ``excite train`` reads it."""
    if option.convert is not None:
        try:
            value = option.convert(text)
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(option.convert, "valid")
            raise ExciteError(f"{option.flag} {text!r} is not {what}") from None
    else:
        value = text
    if option.choices is not None and value not in option.choices:
        raise ExciteError(f"{option.flag} {text!r} is not valid: choose one of {', '.join(option.choices)}")
    return value


def _distinct(flag: str, values: list) -> list:
    seen = []
    for value in values:
        if value in seen:
            raise ExciteError(f"{flag} lists {value!r} twice")
        seen.append(value)
    return values


_FIELDS = [f.name for f in TrainConfig.__dataclass_fields__.values()]


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    """The sweep an ``excite sweep`` command line asks for; a mistake in it is one ExciteError line."""
    options = _text_options()
    fixed: dict[str, Any] = {}
    axes: dict[str, Axis] = {}
    for name in _FIELDS:
        given = getattr(args, name, None)
        if given is None or name in ("model_kwargs", "out", "run_id"):  # --out is the sweep's directory
            continue
        if name not in options:  # a switch (--hflip, --nesterov...)
            fixed[name] = given
            continue
        values = _distinct(options[name].flag, [_convert(options[name], p) for p in _pieces(options[name].flag, given)])
        if len(values) == 1:
            fixed[name] = values[0]
        elif name in OPERATIONAL:
            raise ExciteError(f"{options[name].flag} takes one value for the whole sweep, got {given!r}")
        else:
            axes[name] = Axis(name, tuple(values))

    model_kwargs: dict[str, Any] = {}
    arg_axes: list[Axis] = []
    for text in getattr(args, "model_kwargs", None) or []:
        key, sep, rest = text.partition("=")
        if not sep or not key:
            raise ExciteError(f"--model-arg expects KEY=VALUE, got {text!r}")
        if key in model_kwargs or any(axis.name == key for axis in arg_axes):
            raise ExciteError(f"--model-arg {key} is given twice: list its values once, as {key}=A,B")
        flag = f"--model-arg {key}"
        values = _distinct(flag, [_key_value(f"{key}={piece}")[1] for piece in _pieces(flag, rest)])
        if len(values) == 1:
            model_kwargs[key] = values[0]
        elif key in _FIELDS:  # its values would be named like the train option's in run names and results
            raise ExciteError(f"{flag} shares its name with the train option --{key.replace('_', '-')}; a sweep "
                              "cannot vary it")
        else:
            arg_axes.append(Axis(key, tuple(values), model_arg=True))
    if model_kwargs:
        fixed["model_kwargs"] = model_kwargs

    search = [_search_range(text) for text in getattr(args, "search", None) or []]
    seeds = _seeds(args, fixed, axes, default=1 if search else DEFAULT_SEEDS)
    plan = SweepPlan(fixed=fixed, axes=[*axes.values(), *arg_axes], seeds=seeds,
                     config_file=getattr(args, "config", None), search=search)
    trials = getattr(args, "trials", None)
    if search:
        _check_search(plan)
        plan.trials = DEFAULT_TRIALS if trials is None else trials
        if plan.trials < 1:
            raise ExciteError(f"--trials must be at least 1, got {plan.trials}")
    elif trials is not None:
        raise ExciteError("--trials counts the trials of --search; a grid trains each of its points once")
    return plan


def _seeds(args: argparse.Namespace, fixed: dict, axes: dict, default: int) -> list[int]:
    count = getattr(args, "seeds", None)
    if count is not None:
        if "seed" in fixed or "seed" in axes:
            raise ExciteError("give either --seeds N or --seed A,B,..., not both")
        if count < 1:
            raise ExciteError(f"--seeds must be at least 1, got {count}")
        return list(range(count))
    if "seed" in axes:
        return list(axes.pop("seed").values)
    if "seed" in fixed:
        return [fixed.pop("seed")]
    return list(range(default))


def _numeric_fields() -> dict[str, type]:
    """The TrainConfig fields of type int or float (Optional or not): what --search can tune."""
    return {f.name: option_type(f.name) for f in dataclasses.fields(TrainConfig)
            if option_type(f.name) in (int, float)}


def _search_range(text: str) -> SearchRange:
    key, sep, rest = text.partition("=")
    parts = rest.split(":")
    name = key.strip().lstrip("-").replace("-", "_")
    if not sep or len(parts) not in (2, 3) or parts[2:] not in ([], ["log"]):
        raise ExciteError(f"--search {text!r}: expected {SEARCH_SYNTAX}, e.g. lr=0.01:0.3:log")
    numeric = _numeric_fields()
    if name not in numeric:
        raise ExciteError(f"--search {name}: not a numeric train option; choose one of {', '.join(numeric)}")
    option = _Option(f"--search {name}", numeric[name], None)
    low, high = (_convert(option, part.strip()) for part in parts[:2])
    log = len(parts) == 3
    if not low < high:
        raise ExciteError(f"--search {text!r}: LOW must be below HIGH")
    if log and low <= 0:
        raise ExciteError(f"--search {text!r}: a log scale needs LOW above 0")
    return SearchRange(name, low, high, log=log, integer=numeric[name] is int)


def _check_search(plan: SweepPlan) -> None:
    if plan.axes:
        axis = plan.axes[0]
        flag = f"--model-arg {axis.name}" if axis.model_arg else f"--{axis.name.replace('_', '-')}"
        raise ExciteError(f"--search tunes options with Optuna's sampler, so {flag} takes one value here; or leave "
                          "out --search to train the grid")
    names = [r.name for r in plan.search]
    for name in names:
        if names.count(name) > 1:
            raise ExciteError(f"--search {name} is given twice")
        if name in plan.fixed:
            raise ExciteError(f"--{name.replace('_', '-')} is both given and searched: drop one of the two")
    for which in ("low", "high"):  # every sampled value lies between two that are valid
        values = {r.name: getattr(r, which) for r in plan.search}
        try:
            run_config(plan, values, plan.seeds[0], "sweep-check")
        except ExciteError as e:
            raise ExciteError(f"--search at its {which} end: {e}") from None


def format_value(value: Any) -> str:
    """A value as it appears in a run directory's name: ``[4, 4, 4]`` -> ``4_4_4``, ``0.1`` -> ``0.1``."""
    if isinstance(value, (list, tuple)):
        text = "_".join(format_value(v) for v in value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}_{format_value(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^\w.+=,-]", "_", text)


def point_name(axes: list[Axis], values: dict[str, Any], seed: int | None) -> str:
    """A run directory's name: the model, then ``KEY=VALUE`` of each other axis, then ``seed<N>`` when the seeds
    vary, joined by ``-``, e.g. ``se_resnet20_cifar-growth_rate=24-seed1``."""
    parts = [format_value(values[a.name]) if a.name == "model" else f"{a.name}={format_value(values[a.name])}"
             for a in axes]
    if seed is not None:
        parts.append(f"seed{seed}")
    return "-".join(parts) or "run"


def trial_name(number: int, seed: int | None) -> str:
    """The run directory's name of a --search trial (and seed, when several are given)."""
    return f"trial{number:03d}" + (f"-seed{seed}" if seed is not None else "")


def grid_points(plan: SweepPlan) -> list[GridPoint]:
    """Every run of a grid: seeds outermost, so that each seed's variants finish before the next seed starts and a
    sweep stopped half-way already has paired results; then the axes in order."""
    points = []
    names = [axis.name for axis in plan.axes]
    for seed in plan.seeds:
        for combination in itertools.product(*(axis.values for axis in plan.axes)):
            values = dict(zip(names, combination))
            points.append(GridPoint(point_name(plan.axes, values, seed if len(plan.seeds) > 1 else None),
                                    values, seed))
    seen: dict[str, GridPoint] = {}
    for point in points:
        if point.name in seen:
            first = seen[point.name].values
            raise ExciteError(f"two runs of the grid would share the directory name {point.name} ({first} and "
                              f"{point.values}): give the values in forms that read differently")
        seen[point.name] = point
    return points


def run_config(plan: SweepPlan, values: dict[str, Any], seed: int, out: str | Path, name: str = "") -> TrainConfig:
    """The validated TrainConfig of one run: the fixed options, the axes' (or searched options') ``values``,
    ``seed`` and ``out``, read as ``excite train`` would read the same flags."""
    model_args = {a.name for a in plan.axes if a.model_arg}
    options = {k: v for k, v in plan.fixed.items() if k != "model_kwargs"}
    options.update({k: v for k, v in values.items() if k not in model_args})
    model_kwargs = {**plan.fixed.get("model_kwargs", {}), **{k: v for k, v in values.items() if k in model_args}}
    args = argparse.Namespace(**options, model_kwargs=list(model_kwargs.items()) or None, seed=seed, out=str(out))
    try:
        return resolve_config(plan.config_file, **_train_overrides(args))
    except ExciteError as e:
        raise ExciteError(f"run {name}: {e}" if name else str(e)) from None


def grid_configs(plan: SweepPlan, sweep_dir: str | Path) -> dict[str, TrainConfig]:
    """Each grid point's name and validated TrainConfig (its run directory inside ``sweep_dir``), in grid order."""
    return {p.name: run_config(plan, p.values, p.seed, Path(sweep_dir) / p.name, p.name) for p in grid_points(plan)}


def describe_plan(plan: SweepPlan) -> dict[str, Any]:
    """The plan as plain JSON values (what sweep.json records, and what a restarted sweep must match), without the
    operational options, which may differ between sessions, and --trials, which may grow."""
    config_values = read_config_file(plan.config_file) if plan.config_file else None
    record = {
        "fixed": {k: v for k, v in plan.fixed.items() if k not in OPERATIONAL},
        "axes": [{"name": a.name, "values": list(a.values), "model_arg": a.model_arg} for a in plan.axes],
        "seeds": list(plan.seeds),
        "search": [vars(r) for r in plan.search],
        "config_file": plan.config_file, "config_values": config_values,
    }
    return json.loads(json.dumps(record))  # tuples become lists, as they read back from the file


def fingerprint(plan: SweepPlan) -> str:
    """8 hex digits that tell sweeps of different options apart (the default directory's suffix)."""
    import hashlib  # here, not at the top: the CLI imports this module to build its parser, for every command

    return hashlib.sha256(json.dumps(describe_plan(plan), sort_keys=True).encode()).hexdigest()[:8]


def default_sweep_dir(plan: SweepPlan) -> Path:
    """``sweeps/<data>-<fingerprint>``: the same command finds the same directory, so running it again continues."""
    data = Path(str(plan.fixed.get("data") or TrainConfig.data)).name or "data"
    return Path("sweeps") / f"{format_value(data)}-{fingerprint(plan)}"
