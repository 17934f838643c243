"""The default experiment as ``make run`` runs it, timed: wall clock of the whole command
(process start-up, data loading and compilation included) beside the simulation time
and final accuracy the run reports.

Usage: ``.venv/bin/python bench/default_run.py [--repeats 3] [--quick]``. Writes
``bench/results/default_run.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import machine  # bench/machine.py: what every results file records
from sweep import FEDSIM, ROOT, timed  # one timed `fedsim` subprocess, as the sweep bench

RESULTS = ROOT / "bench" / "results" / "default_run.json"


def one_run() -> dict:
    """Run ``fedsim run configs/default.yaml`` once; its wall time and final summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        wall = timed([*FEDSIM, "run", "configs/default.yaml", "--out", str(out), "--quiet"])
        summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    return {
        "wall_s": wall,
        "simulation_s": summary["seconds"],
        "rounds": summary["rounds"],
        "test_accuracy": final["test_accuracy"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    info = machine.machine_info()
    runs = [one_run() for _ in range(args.repeats)]
    for r in runs:
        print(json.dumps(r), flush=True)
    result = {
        "benchmark": "default_run",
        "command": "fedsim run configs/default.yaml",
        "machine": info,
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_simulation_s": statistics.median(r["simulation_s"] for r in runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
