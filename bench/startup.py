"""How long the light commands take to start: wall time of `excite --version`, `excite models` and
`excite --help`, each a fresh process, next to `python -c "import torch"` and `python -c "from
excite.models import create_model"` (what every command paid before the CLI stopped importing torch up
front).

Each command runs once untimed (so the files are in the page cache: "cold-ish" means a new interpreter,
not a cold disk), then ``--runs`` times, the commands interleaved so that a busy spell hits all of them
alike; the median is the figure, min and max show the spread. The machine's load average before and
after is recorded, since other processes on a 2-core machine move these numbers. ``--before DIR`` also
times the excite commands with the source tree DIR first on ``PYTHONPATH`` (an older checkout, e.g.
``git archive COMMIT | tar -x -C DIR``). Run from the repository root::

    .venv/bin/python bench/startup.py                      # prints the table
    .venv/bin/python bench/startup.py --out bench/results/startup-cpu-$(date +%F)   # also .json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

PY = sys.executable
# The console script next to this interpreter, as a user runs it; `python -m excite.cli` where there is none.
EXCITE = [str(Path(PY).with_name("excite"))] if Path(PY).with_name("excite").exists() else [PY, "-m", "excite.cli"]

COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "excite --version": [*EXCITE, "--version"],
    "excite models": [*EXCITE, "models"],
    "excite --help": [*EXCITE, "--help"],
    "python -c 'import torch'": [PY, "-c", "import torch"],
    # What a command that builds a model pays, torch included (before the change, every command paid it).
    "python -c 'from excite.models import create_model'": [PY, "-c", "from excite.models import create_model"],
}


# Every command runs in an empty folder: `python -c` puts its working directory first on sys.path, where a
# source tree would shadow the excite being timed.
NEUTRAL_DIR = tempfile.mkdtemp(prefix="excite-startup-")


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """Seconds of wall time of one fresh process of ``argv``."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=NEUTRAL_DIR)
    return time.perf_counter() - start


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commands(before: Path | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Label -> (argv, environment) of every command to time."""
    env = dict(os.environ)
    timed = {label: (argv, env) for label, argv in COMMANDS.items()}
    if before is not None:
        old_env = {**env, "PYTHONPATH": str(before.resolve())}
        found = subprocess.run([PY, "-c", "import excite; print(excite.__file__)"], env=old_env, check=True,
                               capture_output=True, text=True, cwd=NEUTRAL_DIR).stdout.strip()
        if not Path(found).resolve().is_relative_to(before.resolve()):
            raise SystemExit(f"--before {before}: excite is imported from {found}, not from that tree")
        for label, argv in COMMANDS.items():
            if "excite" in label:
                timed[f"{label} (before)"] = (argv, old_env)
    return timed


def measure(runs: int, before: Path | None = None) -> dict:
    load_before = os.getloadavg()
    timed = commands(before)
    times: dict[str, list[float]] = {label: [] for label in timed}
    for i in range(runs + 1):
        for label, (argv, env) in timed.items():
            seconds = run_once(argv, env)
            if i:  # the first round only fills the page cache
                times[label].append(seconds)
    results = {label: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                       "max_s": round(max(t), 3), "runs": runs} for label, t in times.items()}
    return {
        "what": "wall time of fresh processes (median of the timed runs, after one untimed run)",
        "device": cpu_name(), "cores": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": metadata.version("torch"),
                     "torchvision": metadata.version("torchvision"), "excite": metadata.version("excite")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        # Without bytecode caching every start recompiles excite's own modules (a few ms).
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "before": str(before) if before is not None else None,
        "results": results,
    }


def to_markdown(result: dict) -> str:
    lines = [f"### Start-up on {result['device']} ({result['cores']} cores), {result['date']}", "",
             f"python {result['versions']['python']}, torch {result['versions']['torch']}, torchvision "
             f"{result['versions']['torchvision']}, excite {result['versions']['excite']}; load average (1, 5, 15 "
             f"min) {result['load_average_before']} before, {result['load_average_after']} after", "",
             "| command | median s | min s | max s |", "|---|---|---|---|"]
    lines += [f"| `{label}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |"
              for label, r in result["results"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (default 10)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--before", type=Path, help="also time the excite commands with this source tree's excite")
    args = parser.parse_args()
    result = measure(args.runs, args.before)
    report = to_markdown(result)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
