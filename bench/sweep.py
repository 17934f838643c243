"""One ``fedsim sweep`` of 64 runs against the same runs as separate ``fedsim run``
processes, timed back to back (wall clock, each side including its process start-up).

64 runs = 4 seeds x 4 client learning rates x 4 ALIE strengths (``attack.z``) on MNIST,
1,000 clients (iid, 60 samples each: 2 local steps of 32), 100 participants per round,
MLP(100), 20% malicious clients, ``--rounds`` rounds, once per rule in ``--aggregator``
(default: FedAvg, then coordinate-wise trimmed mean). The sweep saves each process's
start-up and compile, not compute (on a CPU a vmapped run costs what a lone one does), so
the ratio grows as rounds get cheaper: FedAvg's rounds cost half the trimmed mean's.
Timing all 64 separate processes would take long on a small machine, so
``--separate K`` (default 4) times the first K and extrapolates linearly to 64
(printed). The separate runs' final accuracies are checked against the sweep's records.

    .venv/bin/python bench/sweep.py [--rounds 10] [--separate 4] [--aggregator mean ...]

Writes ``bench/results/sweep.json`` for the trimmed mean, ``sweep_<aggregator>.json`` for
another rule.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine  # bench/machine.py: what every results file records
import yaml

ROOT = Path(__file__).resolve().parent.parent
FEDSIM = [sys.executable, "-m", "fedsim.cli"]


def sweep_doc(rounds: int, aggregator: str = "trimmed_mean", base: dict | None = None) -> dict:
    """The 64-run sweep; ``base`` replaces top-level keys of its base config (e.g. a
    smaller ``data`` and ``client`` for a smoke run, as bench/gpu.py --tiny does)."""
    return {
        "base": {
            "rounds": rounds,
            "eval_every": rounds,
            "data": {"name": "mnist", "n_clients": 1000, "partition": {"name": "iid"}},
            "model": {"name": "mlp", "widths": [100]},
            "client": {"participants": 100, "local_epochs": 1, "batch_size": 32},
            "server": {"optimizer": "sgd", "lr": 1.0},
            "aggregator": {"name": aggregator},
            "attack": {"name": "alie", "fraction": 0.2},
            **(base or {}),
        },
        "grid": {"client.lr": [0.05, 0.1, 0.2, 0.3], "attack.z": [0.25, 0.5, 1.0, 1.5]},
        "seeds": 4,
    }


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--separate", type=int, default=4, help="separate runs to time")
    parser.add_argument(
        "--aggregator", nargs="+", default=["mean", "trimmed_mean"], help="the runs' rule(s)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    for aggregator in args.aggregator:
        print(f"-- {aggregator} + ALIE", flush=True)
        bench_one(args.rounds, args.separate, aggregator)


def bench_one(
    rounds: int,
    separate: int,
    aggregator: str,
    base: dict | None = None,
    results: Path | None = None,
    name: str | None = None,
) -> dict:
    """Time the sweep and ``separate`` lone runs; writes ``results/name`` (default
    bench/results/sweep.json or sweep_<aggregator>.json) and returns what it wrote."""
    from fedsim.config import dump
    from fedsim.sweep import expand

    work = Path(tempfile.mkdtemp(prefix="fedsim-bench-sweep-"))
    try:
        doc = sweep_doc(rounds, aggregator, base)
        sweep_file = work / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump(doc))
        runs = expand(doc).runs
        assert len(runs) == 64

        out = work / "sweep-out"
        t_sweep = timed([*FEDSIM, "sweep", str(sweep_file), "--out", str(out), "--quiet"])
        sweep_summaries = [
            json.loads((out / "runs" / r.run_id / "summary.json").read_text()) for r in runs
        ]
        print(
            f"fedsim sweep, 64 runs ({sweep_summaries[0]['batch']} per program): {t_sweep:.1f} s",
            flush=True,
        )

        k = min(separate, 64)
        times, diffs = [], []
        for i, run in enumerate(runs[:k]):
            cfg_file = work / f"run{i}.yaml"
            cfg_file.write_text(dump(run.cfg))
            run_out = work / f"run{i}"
            times.append(timed([*FEDSIM, "run", str(cfg_file), "--out", str(run_out), "--quiet"]))
            alone = json.loads((run_out / "summary.json").read_text())["final"]["test_accuracy"]
            diffs.append(abs(alone - sweep_summaries[i]["final"]["test_accuracy"]))
            print(f"  separate fedsim run {i + 1}/{k}: {times[-1]:.1f} s", flush=True)
        per_run = sum(times) / k
        t_separate = per_run * 64
        speedup = t_separate / t_sweep
        print(
            f"separate processes: {k} of 64 timed, {per_run:.1f} s each -> "
            f"{t_separate:.0f} s extrapolated to 64"
        )
        print(
            f"speed-up of one sweep over 64 processes: {speedup:.1f}x "
            f"(max |accuracy difference| on the {k} runs compared: {max(diffs):.2e})"
        )
        result = {
            "bench": "sweep",
            "runs": 64,
            "rounds": rounds,
            "sweep_seconds": t_sweep,
            "runs_per_program": sweep_summaries[0]["batch"],
            "separate_timed": k,
            "separate_seconds_each": times,
            "separate_seconds_extrapolated": t_separate,
            "speedup": speedup,
            "max_accuracy_difference": max(diffs),
            "machine": machine.machine_info(),
            "config": doc,
        }
        results = ROOT / "bench" / "results" if results is None else results
        results.mkdir(parents=True, exist_ok=True)
        if name is None:
            name = "sweep.json" if aggregator == "trimmed_mean" else f"sweep_{aggregator}.json"
        (results / name).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
