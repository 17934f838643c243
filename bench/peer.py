"""Peer-to-peer rounds, side by side: gathered neighbourhoods against dense weights, a
peer-to-peer round against the star round of as many participants, and the fused round
against a per-node Python loop.

1. Every node of a ring (or a k-regular graph) trains a small MLP on its `digits` shard
   and aggregates its neighbourhood with the median. The same round runs twice: each
   node's rule on its K gathered rows (``topology.gather``), and on all n rows with weight
   0 for non-neighbours (``topology.dense``); then the gathered round alone at node counts
   where the dense one would need n² rows.
2. ``--vs-star N``: N nodes on MNIST (MLP 784-100-10, batch 32, 1 local step, iid; the
   setting of ``round_throughput.py``), each of ring, k_regular (k = 8) and epidemic
   (s = 8) with gossip, median and self-centred clipping, beside the star round of N
   participants with the matching server rule (mean, median, centred clipping) in the
   same run. The ratio peer / star is what a node's graph costs over one server.
3. ``--loop N``: the fused peer-to-peer round (k_regular, k = 8, median and gossip) against a
   per-node Python loop (the style of simulators that keep one model per node): per node,
   one jitted local training and one jitted rule over its gathered rows, then one jitted
   optimizer step, with the same keys; the loop's first round is checked to equal the
   fused round's. Beside it, when PyTorch is installed (``make .venv/.installed-bench``), a
   plain PyTorch per-node loop in the style of the peer-to-peer papers' own simulators:
   every node's model a row of one ``[n, d]`` tensor, one module reused for training
   (``vector_to_parameters``, one SGD step on the node's batch), then each node's
   neighbourhood ``sent[index[k]]`` reduced with ``torch.median`` or the
   Metropolis–Hastings weights. Same graph, shapes, batch size and step count; its own
   batches and initial weights, so its models are not compared with the fused round's.

4. ``--parts N``: where a node's median spends its time, without training: the column
   blocks of ``round.by_column_blocks`` at N nodes of an 8-regular graph, d = 79,510 (the
   MNIST MLP's), in the median's layout (``round.column_layout``), with three rules in
   turn: a mean (the blocks alone), the nine-row select alone (``kernels.middle_values``)
   and the registered median rule itself (with its tie weights). Median of 5 calls after
   one.

Median seconds per scanned round (5 rounds a call, 5 calls after a warm-up; the loop:
median of 3 rounds after one). Writes ``bench/results/peer.json`` with the machine.

Usage: ``python bench/peer.py [--nodes 64 256] [--large 1024] [--vs-star 1000]
[--loop 100] [--parts 1000] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from machine import machine_info  # noqa: E402
from round_throughput import LR, HostData, median_time, torch_setup  # noqa: E402
from round_throughput import make_setup as mnist_setup  # noqa: E402

import fedsim.round as rounds  # noqa: E402
from fedsim import aggregators, memory  # noqa: E402
from fedsim import kernels as ops  # noqa: E402
from fedsim import topology as topologies  # noqa: E402
from fedsim.config import load_config, to_spec  # noqa: E402
from fedsim.setup import components, flat_unravel, prepare  # noqa: E402
from fedsim.types import AggContext  # noqa: E402

ROUNDS, REPEATS = 5, 5
GRAPHS_VS_STAR = ("{name: ring}", "{name: k_regular, k: 8}", "{name: epidemic, s: 8}")
# a peer-to-peer rule and the server rule it is compared with
RULES_VS_STAR = {
    "gossip": "mean",
    "median": "median",
    "self_centered_clipping": "centered_clipping",
}
LOOP_GRAPH = "{name: k_regular, k: 8}"
LOOP_RULES = ("median", "gossip")  # a rule whose arithmetic dominates, and a cheap one


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


def peer_vs_star(nodes: int, results: dict, out: str) -> None:
    """Section 2: each graph x rule at ``nodes`` nodes beside the star round."""
    star = {}
    for rule, server_rule in RULES_VS_STAR.items():
        setup, hp = mnist_setup(nodes, 1, aggregator=server_rule)
        star[rule] = seconds_per_round(setup, hp, dense=False)
        for graph in GRAPHS_VS_STAR:
            setup, hp = mnist_setup(nodes, 1, aggregator=rule, extra=[f"topology={graph}"])
            peer = seconds_per_round(setup, hp, dense=False)
            row = {"section": "vs_star", "graph": graph, "nodes": nodes, "rule": rule}
            row |= {"peer_s": peer, "star_rule": server_rule, "star_s": star[rule]}
            row["peer_over_star"] = peer / star[rule]
            row |= memory_of(setup, hp)
            record(row, results, out)


def memory_of(setup, hparams) -> dict:
    """The planner's estimate for one run of ``setup`` (no chunking) beside XLA's own
    figure for its compiled chunk of rounds (arguments + outputs + temporaries), GiB."""
    estimate = memory.estimate(memory.footprint(setup), 1, None)
    state = jax.jit(rounds.make_init(setup))(jax.random.PRNGKey(0), hparams)
    compiled = jax.jit(rounds.make_chunk(setup, 1)).lower(state, hparams, setup.data).compile()
    ma = compiled.memory_analysis()
    xla = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    return {"estimate_gb": estimate / memory.GB, "xla_gb": xla / memory.GB}


def python_loop(setup, hparams, n_rounds: int):
    """Section 3's loop: ``n_rounds`` rounds over a per-node list of models, one jitted
    call per node and stage. Returns (median seconds per round after the first, the
    models after the first round as an ``[n, d]`` array)."""
    spec = setup.spec
    n = spec.n_clients
    agg, attack = components(setup)
    _, ravel_rows = flat_unravel(setup)
    state = jax.jit(rounds.make_init(setup))(jax.random.PRNGKey(0), hparams)
    train = jax.jit(rounds.make_train(setup, attack), static_argnames="own")
    aggregate = jax.jit(rounds.make_aggregate(setup, agg))
    apply = jax.jit(rounds.make_apply(setup))
    topo = rounds.topology_of(spec)
    at = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
    models = [at(state.params, slice(k, k + 1)) for k in range(n)]  # leading axis [1]
    opts = [at(state.server_opt_state, k) for k in range(n)]
    agg_states = [at(state.agg_state, k) for k in range(n)]
    times, first = [], None
    for r in range(n_rounds):
        start = time.perf_counter()
        keys = rounds.round_keys(state._replace(round=jnp.asarray(r, jnp.int32)))
        who = rounds.sample(keys.sample, state.malicious, setup.data, n, n)
        index, valid = topo.gather(keys.aggregate)
        index, valid = np.asarray(index), np.asarray(valid)
        own, sent = [], []
        for k in range(n):
            one = rounds.Participants(*(x[k : k + 1] for x in who))
            update = train(models[k], one, keys.train, hparams, setup.data, own=True).updates[0]
            own.append(ravel_rows(models[k])[0])
            sent.append(own[k] + update)
        node_keys = jax.random.split(keys.aggregate, n)
        degrees = jnp.asarray(valid.sum(axis=1) - 1.0, jnp.float32)
        for k in range(n):
            idx = index[k]
            rows = jnp.stack([sent[j] for j in idx]) - own[k]
            w = jnp.where(jnp.asarray(valid[k]), who.weights[idx], 0.0)
            k_rule, _ = jax.random.split(node_keys[k])
            view = rounds.PeerView(jnp.int32(0), degrees[idx], None, None)
            out = aggregate(
                rows, w, who.clients[idx], agg_states[k], k_rule, hparams, setup.data, own[k], view
            )
            params, opts[k] = apply(
                jax.tree.map(lambda x: x[0], models[k]), opts[k], out.delta, hparams
            )
            models[k], agg_states[k] = jax.tree.map(lambda x: x[None], params), out.agg_state
        jax.block_until_ready(models)
        times.append(time.perf_counter() - start)
        if r == 0:
            first = np.concatenate([np.asarray(ravel_rows(m)) for m in models])
    return statistics.median(times[1:]), first


def torch_node_loop(setup, rule: str, n_rounds: int) -> float:
    """Section 3's PyTorch loop (module docstring): median seconds per round after the
    first of ``n_rounds``."""
    import torch
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores fedsim may use
    host = HostData(setup)
    model, x_all, y_all, loss_fn = torch_setup(host)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    index, valid = (
        np.array(a) for a in rounds.topology_of(setup.spec).gather(jax.random.PRNGKey(0))
    )
    n = len(index)
    degree = valid.sum(axis=1) - 1  # neighbours besides the node itself
    mixing = np.where(valid, 1.0 / (1 + np.maximum(degree[:, None], degree[index])), 0.0)
    mixing[:, 0] += 1 - mixing.sum(axis=1)  # Metropolis–Hastings: the rest stays home
    mixing = torch.from_numpy(mixing.astype(np.float32))
    models = parameters_to_vector(model.parameters()).detach().repeat(n, 1)
    rng, times = np.random.default_rng(0), []
    for _ in range(n_rounds):
        start = time.perf_counter()
        sent = torch.empty_like(models)
        for k in range(n):
            vector_to_parameters(models[k].clone(), model.parameters())
            for rows in host.batches(k, 1, rng):
                idx = torch.from_numpy(rows)
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x_all[idx]), y_all[idx]).backward()
                opt.step()
            sent[k] = parameters_to_vector(model.parameters()).detach()
        with torch.no_grad():
            for k in range(n):
                rows = sent[torch.from_numpy(index[k][valid[k]])]
                if rule == "median":
                    models[k] = rows.median(dim=0).values
                else:
                    models[k] = mixing[k][torch.from_numpy(valid[k])] @ rows
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def fused_vs_loop(nodes: int, results: dict, out: str, rule: str) -> None:
    """Section 3: the fused round against ``python_loop`` (and ``torch_node_loop`` when
    PyTorch is installed) at ``nodes`` nodes."""
    record(loop_row(nodes, rule), results, out)


def loop_row(nodes: int, rule: str) -> dict:
    """Section 3's row at ``nodes`` nodes (``bench/gpu.py``'s ``peer`` section too)."""
    setup, hp = mnist_setup(nodes, 1, aggregator=rule, extra=[f"topology={LOOP_GRAPH}"])
    fused = seconds_per_round(setup, hp, dense=False)
    loop, first = python_loop(setup, hp, n_rounds=4)
    state = jax.jit(rounds.make_init(setup))(jax.random.PRNGKey(0), hp)
    after, _ = jax.jit(rounds.make_round(setup))(state, hp, setup.data)
    _, ravel_rows = flat_unravel(setup)
    np.testing.assert_allclose(first, np.asarray(ravel_rows(after.params)), rtol=1e-4, atol=1e-5)
    row = {"section": "loop", "graph": LOOP_GRAPH, "nodes": nodes, "rule": rule}
    row |= {"fused_s": fused, "python_loop_s": loop, "loop_over_fused": loop / fused}
    try:
        import torch  # noqa: F401
    except ImportError:
        row["torch_loop"] = "skipped: PyTorch not installed (make .venv/.installed-bench)"
    else:
        row["torch_loop_s"] = torch_node_loop(setup, rule, n_rounds=4)
        row["torch_loop_over_fused"] = row["torch_loop_s"] / fused
    return row


def median_parts(nodes: int, results: dict, out: str, d: int = 79_510) -> None:
    """Seconds of the median's column blocks at ``nodes`` nodes of an 8-regular graph with
    three rules in turn (the module docstring's section 4)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    sent, own = (jax.random.normal(k, (nodes, d)) for k in keys[:2])
    index, _ = topologies.make("k_regular", nodes, k=8).gather(keys[2])
    rows = index.shape[1]
    width, at_once = rounds.column_layout(nodes, rows, "median")
    present, no_weight = jnp.ones(rows, bool), jnp.zeros(rows)
    median = aggregators.make("median")

    def select(x, mine):
        lo, hi = ops.middle_values(x, present, rows)
        return (lo + hi) / 2, no_weight

    def registered_median(x, mine):
        ctx = AggContext(mine, jax.random.PRNGKey(1), {})
        step, _, info = median.aggregate(x, present.astype(x.dtype), (), ctx)
        return step, info.weight

    def seconds(rule) -> float:
        blocks = jax.jit(
            lambda s, o: rounds.by_column_blocks(rule, s, o, index, (), True, width, at_once)
        )
        return median_time(lambda: jax.block_until_ready(blocks(sent, own)), REPEATS)[0]

    row = {"section": "parts", "graph": "{name: k_regular, k: 8}", "nodes": nodes, "d": d}
    row |= {"width": width, "nodes_at_once": at_once}
    row["mean_s"] = seconds(lambda x, mine: (jnp.mean(x, axis=0), no_weight))
    row["select_s"] = seconds(select)
    row["median_s"] = seconds(registered_median)
    record(row, results, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--large", type=int, nargs="*", default=[1024])
    parser.add_argument("--vs-star", type=int, nargs="*", default=[1000])
    parser.add_argument("--loop", type=int, nargs="*", default=[100])
    parser.add_argument("--parts", type=int, nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", default="bench/results/peer.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.large, args.vs_star, args.loop = [16], [32], [20], [20]
        args.parts = [20] if args.parts else []
    results = {"machine": machine_info(), "rounds_per_call": ROUNDS, "calls": REPEATS, "rows": []}
    for graph in ("{name: ring}", "{name: k_regular, k: 6}"):
        for n in args.nodes:
            setup, hp = make_setup(n, graph)
            gathered = seconds_per_round(setup, hp, dense=False)
            dense = seconds_per_round(setup, hp, dense=True)
            row = {"graph": graph, "nodes": n, "gathered_s": gathered, "dense_s": dense}
            row["dense_over_gathered"] = dense / gathered
            record(row, results, args.out)
        for n in args.large:
            setup, hp = make_setup(n, graph)
            row = {"graph": graph, "nodes": n, "gathered_s": seconds_per_round(setup, hp, False)}
            record(row, results, args.out)
    for n in args.vs_star:
        peer_vs_star(n, results, args.out)
    for n in args.loop:
        for rule in LOOP_RULES:
            fused_vs_loop(n, results, args.out, rule)
    for n in args.parts:
        median_parts(n, results, args.out, d=1000 if args.quick else 79_510)


def record(row: dict, results: dict, path: str) -> None:
    """Print a measured row and write the rows so far (``write``)."""
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    write(path, results)


def write(path: str, results: dict) -> None:
    """Write the rows so far (a long bench that is stopped keeps what it measured)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
