"""How long the light commands take to start: wall time of `excite --version`, `excite models` and
`excite --help`, each a fresh process, next to `python -c "import torch"` and `python -c "import
excite.models"` (what every command paid before the CLI stopped importing torch up front).

Each command runs once untimed (so the files are in the page cache: "cold-ish" means a new interpreter,
not a cold disk), then ``--runs`` times; the median is the figure, min and max show the spread. The
machine's load average before and after is recorded, since other processes on a 2-core machine move
these numbers. Run from the repository root::

    .venv/bin/python bench/startup.py                      # prints the table
    .venv/bin/python bench/startup.py --out bench/results/startup-cpu-$(date +%F)   # also .json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
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
    "python -c 'import excite.models'": [PY, "-c", "import excite.models"],
}


def time_command(argv: list[str], runs: int) -> list[float]:
    """Seconds of wall time of ``runs`` fresh processes of ``argv``, after one untimed run."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i:
            times.append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(runs: int) -> dict:
    load_before = os.getloadavg()
    results = {}
    for label, argv in COMMANDS.items():
        times = time_command(argv, runs)
        results[label] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                          "max_s": round(max(times), 3), "runs": runs}
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
    args = parser.parse_args()
    if shutil.which(EXCITE[0]) is None and not Path(EXCITE[0]).exists():
        parser.error(f"{EXCITE[0]} not found")
    result = measure(args.runs)
    report = to_markdown(result)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
