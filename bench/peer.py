"""Peer-to-peer rounds: gathered neighbourhoods against dense weights, side by side.

Every node of a ring (or a k-regular graph) trains a small MLP on its `digits` shard
and aggregates its neighbourhood with the median. The same round runs twice: each
node's rule on its K gathered rows (``topology.gather``), and on all n rows with weight
0 for non-neighbours (``topology.dense``). Median seconds per scanned round (5 rounds a
call, 5 calls after a warm-up), their ratio, and the gathered round alone at node counts
where the dense one would need n² rows. Writes ``bench/results/peer.json`` with the
machine.

Usage: ``python bench/peer.py [--nodes 64 256] [--large 1024] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from machine import machine_info  # noqa: E402

import fedsim.round as rounds  # noqa: E402
from fedsim import topology as topologies  # noqa: E402
from fedsim.config import load_config, to_spec  # noqa: E402
from fedsim.setup import prepare  # noqa: E402

ROUNDS, REPEATS = 5, 5


def make_setup(nodes: int, graph: str):
    overrides = [
        "data.name=digits",
        f"data.n_clients={nodes}",
        f"client.participants={nodes}",
        "data.partition.name=iid",
        "model.widths=[16]",
        "client.local_steps=1",
        "client.local_epochs=null",
        "client.batch_size=8",
        f"topology={graph}",
        "aggregator.name=median",
    ]
    spec, hparams = to_spec(load_config(None, overrides))
    return prepare(spec), hparams


def seconds_per_round(setup, hparams, dense: bool) -> float:
    original = rounds.topology_of
    if dense:
        rounds.topology_of = lambda spec: topologies.dense(original(spec))
    try:
        step = rounds.make_round(setup)
    finally:
        rounds.topology_of = original
    state = jax.jit(rounds.make_init(setup))(jax.random.PRNGKey(0), hparams)
    return timing.seconds_per_round(step, state, hparams, setup.data, ROUNDS, REPEATS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--large", type=int, nargs="*", default=[1024])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", default="bench/results/peer.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.large = [16], [32]
    results = {"machine": machine_info(), "rounds_per_call": ROUNDS, "calls": REPEATS, "rows": []}
    for graph in ("{name: ring}", "{name: k_regular, k: 6}"):
        for n in args.nodes:
            setup, hp = make_setup(n, graph)
            gathered = seconds_per_round(setup, hp, dense=False)
            dense = seconds_per_round(setup, hp, dense=True)
            row = {"graph": graph, "nodes": n, "gathered_s": gathered, "dense_s": dense}
            row["dense_over_gathered"] = dense / gathered
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(args.out, results)
        for n in args.large:
            setup, hp = make_setup(n, graph)
            row = {"graph": graph, "nodes": n, "gathered_s": seconds_per_round(setup, hp, False)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(args.out, results)


def write(path: str, results: dict) -> None:
    """Write the rows so far (a long bench that is stopped keeps what it measured)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
