"""Rounds per second and peak memory against the number of clients (MNIST, MLP(100),
1 local epoch, batch 32, FedAvg), each setting in its own subprocess so its peak RSS is
its own (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read by the child at its end; the
parent also prints ``RUSAGE_CHILDREN``, the largest of them).

Settings (clients / participants per round): 1,000/100, 1,000/1,000, 10,000/100,
10,000/10,000 and 100,000/100. MNIST has 60,000 training samples and every sample goes
to at most one client, so 100,000 clients cannot be cut from it; for that setting only,
this script registers a bench dataset ``mnist_shift2`` (the 60,000 images plus a copy of
each shifted right by one pixel, 120,000 distinct samples) and partitions it iid.

The memory planner (``fedsim.memory``) picks the client chunking for each setting from
the default budget (80% of physical memory) or ``--memory-gb``. Rounds per second are
timed on a second call of the compiled chunk of ``--rounds`` rounds (the first compiles).

    .venv/bin/python bench/scale.py [--rounds 2] [--memory-gb G] [--only 10000/10000]

Writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import machine  # bench/machine.py: what every results file records

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 10_000), (100_000, 100)]
MNIST_TRAIN = 60_000


def _register_shifted_mnist() -> None:
    import numpy as np

    from fedsim.data import REGISTRY, Dataset, load

    @REGISTRY.register("mnist_shift2")
    def mnist_shift2() -> Dataset:
        base = load("mnist")
        shifted = np.zeros_like(base.x_train)
        shifted[:, :, 1:] = base.x_train[:, :, :-1]
        return Dataset(
            "mnist_shift2",
            np.concatenate([base.x_train, shifted]),
            np.concatenate([base.y_train, base.y_train]),
            base.x_test,
            base.y_test,
            base.n_classes,
        )


def child(n_clients: int, participants: int, rounds: int, memory_gb: float | None) -> dict:
    """Run one setting in this process; returns its figures."""
    import jax

    from fedsim import memory
    from fedsim.config import load_config, to_spec
    from fedsim.layout import with_layout
    from fedsim.round import make_chunk, make_init
    from fedsim.setup import prepare

    big = n_clients > MNIST_TRAIN
    if big:
        _register_shifted_mnist()
    over = [
        f"data.name={'mnist_shift2' if big else 'mnist'}",
        f"data.n_clients={n_clients}",
        f"client.participants={participants}",
        f"rounds={rounds}",
        f"eval_every={rounds}",
        "attack.name=none",
        "aggregator.name=mean",
    ]
    if big:
        over.append("data.partition={name: iid}")
    spec, hp = to_spec(load_config(ROOT / "configs" / "default.yaml", over))
    t0 = time.perf_counter()
    setup = prepare(spec)
    prep = time.perf_counter() - t0
    plan = memory.plan(setup, 1, memory.budget_bytes(memory_gb))
    setup = with_layout(setup, client_chunk=plan.client_chunk)
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    chunk = jax.jit(make_chunk(setup, rounds), donate_argnums=0)
    t0 = time.perf_counter()
    state, m = chunk(state, hp, setup.data)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = chunk(state, hp, setup.data)
    jax.block_until_ready(m)
    timed = time.perf_counter() - t0
    return {
        "clients": n_clients,
        "participants": participants,
        "dataset": spec.dataset,
        "n_params": setup.n_params,
        "client_chunk": plan.client_chunk,
        "estimate_gb": plan.estimate_bytes / memory.GB,
        "budget_gb": plan.budget_bytes / memory.GB,
        "prepare_s": prep,
        "compile_and_first_s": first,
        "rounds_per_s": rounds / timed,
        "test_accuracy": float(m["test_accuracy"]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=None)
    parser.add_argument("--only", default=None, help="one setting, CLIENTS/PARTICIPANTS")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        n, m = (int(x) for x in args.child.split("/"))
        print(json.dumps(child(n, m, args.rounds, args.memory_gb)))
        return
    settings = SETTINGS
    if args.only:
        settings = [tuple(int(x) for x in args.only.split("/"))]
    rows = []
    for n, m in settings:
        cmd = [sys.executable, __file__, "--child", f"{n}/{m}", "--rounds", str(args.rounds)]
        if args.memory_gb is not None:
            cmd += ["--memory-gb", str(args.memory_gb)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n} clients / {m} per round: failed\n{proc.stderr[-2000:]}", flush=True)
            rows.append({"clients": n, "participants": m, "error": proc.stderr[-500:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        chunk = row["client_chunk"] or m
        print(
            f"{n:>7} clients, {m:>6} per round: {row['rounds_per_s']:.3f} rounds/s, "
            f"peak RSS {row['peak_rss_gb']:.2f} GB (planner estimate "
            f"{row['estimate_gb']:.2f} GB, clients trained {chunk} at a time, "
            f"dataset {row['dataset']})",
            flush=True,
        )
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    print(f"largest peak RSS of any setting (RUSAGE_CHILDREN): {children:.2f} GB")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = {
        "bench": "scale",
        "rounds_timed": args.rounds,
        "settings": rows,
        "max_child_rss_gb": children,
        "machine": machine.machine_info(),
    }
    name = "scale.json" if not args.only else f"scale-{args.only.replace('/', '-')}.json"
    (results / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
