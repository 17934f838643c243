"""Client-updates per second of fedsim's fused round, beside the way other simulators do it.

For m clients per round (MNIST, MLP 784-100-10, batch 32, 1 or 10 local SGD steps, iid
partition over ``data.n_clients = m`` clients, aggregator ``mean``, no attack) this times,
in one run and on the same machine:

- fedsim: ``lax.scan`` of ``make_round`` over R rounds, jitted, state donated, on
  device data; plus its sub-programs (local training only = the vmapped
  ``client.make_local_train`` as in ``make_round``; training + ravel to ``[m, d]``; the
  aggregation alone) so the table shows where the round's time goes;
- jit loop (FedJAX ``jit``-backend style): one jitted SGD step per batch, called from a
  Python loop over clients and batches (batches gathered on the host, padded to the batch
  size with a mask), deltas averaged on the host;
- torch loop (ByzFL / FLPoison style): sequential PyTorch CPU loop, ``copy.deepcopy`` of
  the global model per client, ``torch.optim.SGD`` over its batches, ``state_dict``
  deltas collected and averaged;
- lean torch loop, the strongest plain loop: one model object reused by every client
  (``load_state_dict`` of the global model, then SGD), deltas summed as they come.

Every path trains each client on the same schedule as fedsim: epochs over the client's
own samples, shuffled each epoch, batches of 32 with a partial last batch, exactly
``local_steps`` steps. Throughput is client-updates per second (m / seconds per round).
At large m the two loops are timed on a subset of clients and scaled (printed).

FLOPs of local training: 6 x 79,400 (weights in matmuls: 784*100 + 100*10) per sample
(forward 2x, backward 4x), counted on the samples the clients really train on (partial
batches count their real rows only), divided by the time of local training alone and
compared with a 4096x4096 fp32 ``jnp.dot`` measured in the same run.

Usage: ``.venv/bin/python bench/round_throughput.py [--quick] [--sizes 100,1000]
[--steps 1,10] [--repeats N] [--no-attacks] [--profile DIR]``.
Writes ``bench/results/round_throughput.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import machine  # bench/machine.py: what every results file records
import numpy as np

from fedsim.config import load_config, to_spec
from fedsim.data import load
from fedsim.round import (
    make_aggregate,
    make_init,
    make_round,
    make_train,
    round_keys,
    sample,
)
from fedsim.setup import components, prepare
from fedsim.task import cross_entropy

RESULTS = Path(__file__).resolve().parent / "results" / "round_throughput.json"
WIDTHS = (100,)
BATCH = 32
MATMUL_WEIGHTS = 784 * 100 + 100 * 10  # weights that take part in matmuls (biases excluded)
FLOPS_PER_SAMPLE = 6 * MATMUL_WEIGHTS  # forward 2x + backward 4x
LR = 0.1
TARGET_VS_TORCH = 5.0  # at 1,000 clients
TARGET_MATMUL_FRACTION = 0.45


# ----------------------------------------------------------------------------- timing


BUDGET_S = 30.0  # past this much timed work per measurement, stop at 2 repeats


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over up to ``repeats`` calls after ``warmup`` calls
    (the first compiles); at least 2 calls, fewer than ``repeats`` when one call is so slow
    that they would exceed ``BUDGET_S``. ``fn`` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and sum(times) + times[-1] > BUDGET_S:
            break
    return statistics.median(times), times


def matmul_gflops(repeats: int, n: int = 4096) -> float:
    """fp32 GFLOP/s of an n x n x n ``jnp.dot`` (2 n^3 FLOPs)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    t, _ = median_time(lambda: dot(a, b).block_until_ready(), repeats)
    return 2 * n**3 / t / 1e9


# ----------------------------------------------------------------------------- fedsim


def make_setup(m: int, steps: int, aggregator: str = "mean", attack: str = "none", extra=()):
    overrides = [
        f"data.n_clients={m}",
        f"client.participants={m}",
        "data.partition.name=iid",
        f"model.widths={list(WIDTHS)}",
        f"client.local_steps={steps}",
        "client.local_epochs=null",
        f"client.batch_size={BATCH}",
        "client.optimizer=sgd",
        f"client.lr={LR}",
        f"aggregator.name={aggregator}",
        f"attack.name={attack}",
        *extra,
    ]
    spec, hparams = to_spec(load_config(None, overrides))
    return prepare(spec), hparams


def client_schedule(setup) -> tuple[np.ndarray, np.ndarray]:
    """Per client of the round: real samples per step ``[m, steps]`` (host numbers)."""
    spec = setup.spec
    count = np.asarray(setup.data.count)[: spec.participants]
    steps = spec.local_steps
    per_epoch = (count + BATCH - 1) // BATCH
    t = np.arange(steps)[None, :]
    within = t % per_epoch[:, None]
    real = np.clip(count[:, None] - within * BATCH, 0, BATCH)
    return count, real


def scanned_rounds(setup, hparams, rounds: int):
    """(jitted ``state -> state`` of ``rounds`` scanned fused rounds, initial state)."""
    round_step = make_round(setup)

    def many(state, hp, data):
        state, _ = jax.lax.scan(lambda s, _: round_step(s, hp, data), state, None, length=rounds)
        return state

    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hparams)
    return jax.jit(many, donate_argnums=0), state


def time_fedsim_round(setup, hparams, repeats: int, rounds: int) -> float:
    """Median seconds per round of ``rounds`` scanned fused rounds."""
    run, state = scanned_rounds(setup, hparams, rounds)
    box = [state]

    def call():
        box[0] = run(box[0], hparams, setup.data)
        jax.block_until_ready(box[0])

    t, _ = median_time(call, repeats)
    return t / rounds


def time_fedsim_parts(setup, hparams, repeats: int) -> dict:
    """Seconds of the round's own stages (``fedsim.round``), each jitted alone: ``train``
    (local training of every participant, ravelled to ``[m, d]``) and ``aggregate`` (the
    rule on that matrix)."""
    agg, attack = components(setup)
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hparams)
    keys = round_keys(state)
    spec = setup.spec
    who = sample(keys.sample, state.malicious, setup.data, spec.n_clients, spec.participants)
    train = jax.jit(make_train(setup, attack))
    aggregate = jax.jit(make_aggregate(setup, agg))
    updates = train(state.params, who, keys.train, hparams, setup.data).updates
    flat = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(state.params)])

    def run_aggregate():
        out = aggregate(
            updates,
            who.weights,
            who.clients,
            state.agg_state,
            keys.aggregate,
            hparams,
            setup.data,
            flat,
        )
        out.delta.block_until_ready()

    out = {}
    out["train"], _ = median_time(
        lambda: train(
            state.params, who, keys.train, hparams, setup.data
        ).updates.block_until_ready(),
        repeats,
    )
    out["aggregate"], _ = median_time(run_aggregate, repeats)
    return out


def time_bare_step(setup, repeats: int) -> float:
    """Seconds of one bare vmapped SGD step on pre-gathered float batches [m, 32, 784]
    (the lower bound for local training of one step: no shuffling, gathering, masking)."""
    m = setup.spec.participants
    apply_fn = setup.module.apply
    params = setup.init_params(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(2), (m, BATCH, 28, 28, 1))
    y = jax.random.randint(jax.random.PRNGKey(3), (m, BATCH), 0, 10)
    ones = jnp.ones(BATCH)

    def one(p, xb, yb):
        g = jax.grad(lambda q: cross_entropy(apply_fn({"params": q}, xb), yb, ones))(p)
        return jax.tree.map(lambda a, b: a - LR * b, p, g)

    step = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    t, _ = median_time(lambda: jax.block_until_ready(step(params, x, y)), repeats)
    return t


# ----------------------------------------------------------------------------- peers


class HostData:
    """The training set as float32 [N, 784] on the host plus the clients' index lists."""

    def __init__(self, setup):
        ds = load(setup.spec.dataset, setup.spec.data_source, setup.spec.data_dir)
        self.x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float32) / 255.0
        self.y = ds.y_train.astype(np.int64)
        self.idx = np.asarray(setup.data.idx)
        self.count = np.asarray(setup.data.count)

    def batches(self, client: int, steps: int, rng: np.random.Generator):
        """Index arrays of the client's ``steps`` batches (epochs, shuffled, partial last)."""
        count = int(self.count[client])
        own = self.idx[client, :count]
        per_epoch = -(-count // BATCH)
        order = None
        for t in range(steps):
            within = t % per_epoch
            if within == 0:
                order = own[rng.permutation(count)]
            yield order[within * BATCH : (within + 1) * BATCH]


def jit_loop(setup, host: HostData, clients: int):
    """FedJAX jit-backend style: a jitted SGD step per batch, Python loops over clients and
    batches, batches padded to 32 with a mask, deltas averaged on the host (numpy)."""
    apply_fn = setup.module.apply
    steps = setup.spec.local_steps

    @jax.jit
    def sgd_step(p, x, y, mask):
        g = jax.grad(lambda q: cross_entropy(apply_fn({"params": q}, x), y, mask))(p)
        return jax.tree.map(lambda a, b: a - LR * b, p, g)

    global_params = setup.init_params(jax.random.PRNGKey(0))
    global_np = jax.tree.map(np.asarray, global_params)

    def run():
        rng = np.random.default_rng(0)
        total = jax.tree.map(np.zeros_like, global_np)
        weight = 0.0
        for c in range(clients):
            p = global_params
            for rows in host.batches(c, steps, rng):
                n = len(rows)
                x = np.zeros((BATCH, 28, 28, 1), np.float32)
                y = np.zeros(BATCH, np.int32)
                x[:n] = host.x[rows].reshape(n, 28, 28, 1)
                y[:n] = host.y[rows]
                mask = (np.arange(BATCH) < n).astype(np.float32)
                p = sgd_step(p, x, y, mask)
            w = float(host.count[c])
            total = jax.tree.map(
                lambda t, a, g, w=w: t + w * (np.asarray(a) - g), total, p, global_np
            )
            weight += w
        return jax.tree.map(lambda t: t / weight, total)

    return run


def pick_torch_threads(host: HostData, steps: int, clients: int) -> tuple[int, dict]:
    """Time the torch loop with ``torch.set_num_threads(cores)`` and with 1 thread on a few
    clients; on a shared, loaded machine intra-op threads can be much slower than one."""
    import torch

    cores = os.cpu_count() or 1
    probe = {}
    for n in dict.fromkeys((cores, 1)):
        torch.set_num_threads(n)
        probe[n], _ = median_time(torch_loop(host, steps, clients), 2)
        probe[n] /= clients
    best = min(probe, key=probe.get)
    torch.set_num_threads(best)
    return best, probe


def torch_setup(host: HostData):
    """What both PyTorch loops start from: the seeded MLP, the data as tensors and the loss."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, WIDTHS[0]), torch.nn.ReLU(),
        torch.nn.Linear(WIDTHS[0], 10),
    )  # fmt: skip
    return model, torch.from_numpy(host.x), torch.from_numpy(host.y), torch.nn.CrossEntropyLoss()


def torch_loop(host: HostData, steps: int, clients: int):
    """ByzFL / FLPoison style: one deepcopy of the global model per client, torch SGD over
    its batches, state_dict deltas collected, then averaged (weighted by sample count)."""
    import torch

    model, x_all, y_all, loss_fn = torch_setup(host)

    def run():
        rng = np.random.default_rng(0)
        global_sd = {k: v.clone() for k, v in model.state_dict().items()}
        deltas, weights = [], []
        for c in range(clients):
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=LR)
            for rows in host.batches(c, steps, rng):
                idx = torch.from_numpy(rows)
                opt.zero_grad()
                loss = loss_fn(local(x_all[idx]), y_all[idx])
                loss.backward()
                opt.step()
            sd = local.state_dict()
            deltas.append({k: sd[k] - global_sd[k] for k in global_sd})
            weights.append(float(host.count[c]))
        total = sum(weights)
        with torch.no_grad():
            return {
                k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) / total
                for k in global_sd
            }

    return run


def lean_torch_loop(host: HostData, steps: int, clients: int):
    """The strongest plain PyTorch loop: the data already in tensors, one model object
    reused by every client (``load_state_dict`` of the global model, then SGD over its
    batches), each delta added at once to a running weighted sum."""
    import torch

    model, x_all, y_all, loss_fn = torch_setup(host)
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=LR)

    def run():
        rng = np.random.default_rng(0)
        total = {k: torch.zeros_like(v) for k, v in global_sd.items()}
        weight = 0.0
        for c in range(clients):
            local.load_state_dict(global_sd)
            for rows in host.batches(c, steps, rng):
                idx = torch.from_numpy(rows)
                opt.zero_grad(set_to_none=True)
                loss_fn(local(x_all[idx]), y_all[idx]).backward()
                opt.step()
            w = float(host.count[c])
            with torch.no_grad():
                for k, v in local.state_dict().items():
                    total[k].add_(v - global_sd[k], alpha=w)
            weight += w
        return {k: v / weight for k, v in total.items()}

    return run


# ----------------------------------------------------------------------------- profile

SKIP_EVENTS = ("end:", "ThreadpoolListener", "ThunkExecutor")


def _describe(hlo: str, name: str) -> str:
    """The HLO instruction ``name`` of the compiled module, with the ops a fusion calls."""
    match = re.search(rf"^\s*(?:ROOT )?%?{re.escape(name)} = (.*)$", hlo, re.M)
    if not match:
        return ""
    text = re.sub(r"\{[0-9,:A-Z()]*\}", "", match.group(1))  # drop layouts
    shape = text.split(" ")[0]
    op = re.search(r"\s([a-z][\w-]*)\(", text)
    desc = f"{shape} {op.group(1) if op else ''}"
    calls = re.search(r"calls=%?([\w.-]+)", text)
    if calls:
        block = re.search(rf"^%?{re.escape(calls.group(1))} .*?\{{\n(.*?)^\}}", hlo, re.M | re.S)
        if block:
            ops = re.findall(r"= \S+ ([a-z][\w-]*)\(", block.group(1))
            keep = [o for o in dict.fromkeys(ops) if o not in ("parameter", "constant")]
            desc += " {" + " ".join(keep[:8]) + "}"
    kind = re.search(r"kind=(\w+)", text)
    return desc + (f" {kind.group(1)}" if kind else "")


def profile_round(m: int, steps: int, rounds: int, top: int, trace_dir: str) -> dict:
    """Trace one call of ``rounds`` fused rounds with ``jax.profiler`` and sum the XLA CPU
    thunks' self time (children of a while loop are not counted in the loop) by name."""
    from jax.profiler import ProfileData

    setup, hparams = make_setup(m, steps)
    run, state = scanned_rounds(setup, hparams, rounds)
    compiled = run.lower(state, hparams, setup.data).compile()
    hlo = compiled.as_text()
    state = compiled(state, hparams, setup.data)  # warm
    jax.block_until_ready(state)
    path = Path(trace_dir) / f"m{m}_s{steps}"
    t0 = time.perf_counter()
    with jax.profiler.trace(str(path)):
        state = compiled(state, hparams, setup.data)
        jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    totals: dict[str, float] = {}
    for xplane in sorted(path.rglob("*.xplane.pb"))[-1:]:
        for plane in ProfileData.from_file(str(xplane)).planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                events = [e for e in line.events if not e.name.startswith(SKIP_EVENTS)]
                events.sort(key=lambda e: (e.start_ns, -e.duration_ns))
                stack: list[list] = []  # [name, end_ns, self_ns]
                for e in events:
                    while stack and stack[-1][1] <= e.start_ns:
                        name, _, own = stack.pop()
                        totals[name] = totals.get(name, 0.0) + own
                    if stack:
                        stack[-1][2] -= e.duration_ns
                    stack.append([e.name, e.end_ns, e.duration_ns])
                for name, _, own in stack:
                    totals[name] = totals.get(name, 0.0) + own
    busy = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    print(
        f"\nprofile: {m} clients x {steps} steps, {rounds} rounds in {1e3 * wall:.0f} ms wall, "
        f"{busy / 1e6:.0f} ms of thunk self time (all threads); trace in {path}"
    )
    rows = []
    for name, ns in ranked:
        desc = _describe(hlo, name)
        rows.append(
            {"thunk": name, "ms_per_round": ns / 1e6 / rounds, "share": ns / busy, "hlo": desc}
        )
        print(
            f"  {ns / 1e6 / rounds:8.2f} ms/round {100 * ns / busy:5.1f}%  {name:<28} {desc[:110]}"
        )
    return {"clients": m, "local_steps": steps, "rounds": rounds, "wall_s": wall, "top": rows}


# ----------------------------------------------------------------------------- main


def peer_clients(m: int, cap: int) -> int:
    return min(m, cap)


def bench_config(m, steps, args, host_cache, matmul):
    setup, hparams = make_setup(m, steps)
    count, real = client_schedule(setup)
    useful_samples = int(real.sum())
    executed_samples = m * steps * BATCH
    reps = args.repeats
    rounds = max(1, min(5, 5000 // (m * steps)))
    t0 = time.perf_counter()
    t_round = time_fedsim_round(setup, hparams, reps, rounds)
    parts = time_fedsim_parts(setup, hparams, reps)
    bare = time_bare_step(setup, reps) if steps == 1 else None
    key = m
    if key not in host_cache:
        host_cache.clear()
        host_cache[key] = HostData(setup)
    host = host_cache[key]
    n_peer = peer_clients(m, args.peer_clients)
    scale = m / n_peer
    peer_reps = max(2, min(reps, 3))
    t_jit, _ = median_time(jit_loop(setup, host, n_peer), peer_reps)
    threads, probe = pick_torch_threads(host, steps, min(n_peer, 50))
    t_torch, _ = median_time(torch_loop(host, steps, n_peer), peer_reps)
    t_lean, _ = median_time(lean_torch_loop(host, steps, n_peer), peer_reps)
    t_jit *= scale
    t_torch *= scale
    t_lean *= scale
    train_gflops = FLOPS_PER_SAMPLE * useful_samples / parts["train"] / 1e9
    row = {
        "clients": m,
        "local_steps": steps,
        "samples_per_client": int(np.median(count)),
        "useful_samples_per_round": useful_samples,
        "executed_samples_per_round": executed_samples,
        "rounds_per_call": rounds,
        "seconds_per_round": {
            "fedsim_round": t_round,
            "fedsim_train": parts["train"],
            "fedsim_aggregate": parts["aggregate"],
            "jit_loop": t_jit,
            "torch_loop": t_torch,
            "lean_torch_loop": t_lean,
        },
        "bare_vmapped_step_seconds": bare,
        "peer_clients_timed": n_peer,
        "torch_threads": threads,
        "torch_probe_seconds_per_client_by_threads": probe,
        "peer_scaled_by": scale,
        "updates_per_s": {
            "fedsim_round": m / t_round,
            "fedsim_train": m / parts["train"],
            "jit_loop": m / t_jit,
            "torch_loop": m / t_torch,
            "lean_torch_loop": m / t_lean,
            "bare_vmapped_step": None if bare is None else m / bare,
        },
        "ratio_fedsim_vs_jit_loop": t_jit / t_round,
        "ratio_fedsim_vs_torch_loop": t_torch / t_round,
        "ratio_fedsim_vs_lean_torch_loop": t_lean / t_round,
        "train_gflops": train_gflops,
        "train_gflops_executed": FLOPS_PER_SAMPLE * executed_samples / parts["train"] / 1e9,
        "train_fraction_of_matmul": train_gflops / matmul,
        "round_gflops": FLOPS_PER_SAMPLE * useful_samples / t_round / 1e9,
        "bench_seconds": time.perf_counter() - t0,
    }
    return row


ATTACK_CASES = (
    # (label, aggregator, attack, extra overrides), compared with the same rule, no attack
    ("mean + alie", "mean", "alie", ("attack.fraction=0.2",)),
    ("krum + strategic_distance", "krum", "strategic_distance", ("attack.fraction=0.2",)),
)


def bench_attacks(args, m=1000, steps=1):
    from fedsim import aggregators, attacks

    out = []
    baselines = {}
    for label, agg, att, extra in ATTACK_CASES:
        if agg not in aggregators.REGISTRY.names() or att not in attacks.REGISTRY.names():
            out.append({"case": label, "skipped": "not registered"})
            continue
        agg_extra = ("aggregator.f=200",) if agg == "krum" else ()
        try:
            if agg not in baselines:
                s, h = make_setup(m, steps, agg, "none", agg_extra)
                baselines[agg] = time_fedsim_round(s, h, args.repeats, 1)
            s, h = make_setup(m, steps, agg, att, (*agg_extra, *extra))
            t = time_fedsim_round(s, h, args.repeats, 1)
        except Exception as err:  # report, never hide
            out.append({"case": label, "skipped": f"failed: {type(err).__name__}: {err}"})
            continue
        out.append(
            {
                "case": label,
                "clients": m,
                "local_steps": steps,
                "seconds_per_round": t,
                "no_attack_seconds_per_round": baselines[agg],
                "cost_vs_no_attack": t / baselines[agg],
            }
        )
    return out


def machine_info() -> dict:
    info = machine.machine_info()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def print_table(rows, matmul):
    head = (
        f"{'clients':>7} {'steps':>5} {'fedsim':>9} {'train':>9} {'jit loop':>9} "
        f"{'torch':>9} {'lean':>9} {'x jit':>6} {'x torch':>7} {'x lean':>6} "
        f"{'train GF/s':>10} {'% matmul':>8}"
    )
    print("\nclient-updates per second (medians)")
    print(head)
    for r in rows:
        u = r["updates_per_s"]
        print(
            f"{r['clients']:>7} {r['local_steps']:>5} {u['fedsim_round']:>9.0f} "
            f"{u['fedsim_train']:>9.0f} {u['jit_loop']:>9.0f} {u['torch_loop']:>9.0f} "
            f"{u['lean_torch_loop']:>9.0f} {r['ratio_fedsim_vs_jit_loop']:>6.1f} "
            f"{r['ratio_fedsim_vs_torch_loop']:>7.1f} {r['ratio_fedsim_vs_lean_torch_loop']:>6.1f} "
            f"{r['train_gflops']:>10.1f} {100 * r['train_fraction_of_matmul']:>7.0f}%"
        )
    print("\nwhere a fused round's time goes (ms per round; the stages of fedsim.round,")
    print(" each jitted alone, medians)")
    print(f"{'clients':>7} {'steps':>5} {'round':>9} {'train':>9} {'agg':>9} {'rest':>9}")
    for r in rows:
        s = r["seconds_per_round"]
        rest = s["fedsim_round"] - s["fedsim_train"] - s["fedsim_aggregate"]
        print(
            f"{r['clients']:>7} {r['local_steps']:>5} {1e3 * s['fedsim_round']:>9.1f} "
            f"{1e3 * s['fedsim_train']:>9.1f} {1e3 * s['fedsim_aggregate']:>9.1f} "
            f"{1e3 * rest:>9.1f}"
        )
    print("(rest: sampling, crafting, the server step and what fusing saves; it can be")
    print(" negative: separate programs do not add up exactly on a noisy machine)")
    for r in rows:
        if r["peer_scaled_by"] > 1:
            print(
                f"note: at {r['clients']} clients the jit and torch loops were timed on "
                f"{r['peer_clients_timed']} clients and scaled by {r['peer_scaled_by']:.0f}"
            )
        probe = r["torch_probe_seconds_per_client_by_threads"]
        print(
            f"torch at {r['clients']} x {r['local_steps']}: probe "
            + ", ".join(f"{n} thread(s) {1e3 * t:.2f} ms/client" for n, t in probe.items())
            + f" -> timed with {r['torch_threads']} thread(s)"
        )
        if r["bare_vmapped_step_seconds"]:
            b = r["bare_vmapped_step_seconds"]
            print(
                f"bare vmapped SGD step at {r['clients']} clients: {r['clients'] / b:.0f} "
                f"updates/s, {FLOPS_PER_SAMPLE * r['clients'] * BATCH / b / 1e9:.1f} GFLOP/s"
            )
    print(
        f"FLOPs: 6 x {MATMUL_WEIGHTS} matmul weights x real samples trained; "
        f"4096^3 fp32 matmul: {matmul:.1f} GFLOP/s"
    )


def check_targets(rows, matmul):
    print("\ntargets")
    for r in rows:
        if r["clients"] == 1000:
            for loop in ("torch_loop", "lean_torch_loop"):
                ratio = r[f"ratio_fedsim_vs_{loop}"]
                print(
                    f"  1000 clients x {r['local_steps']} steps: fedsim / {loop} = "
                    f"{ratio:.1f}x (target >= {TARGET_VS_TORCH:.0f}x) "
                    f"{'MET' if ratio >= TARGET_VS_TORCH else 'NOT MET'}"
                )
    for r in rows:
        ok = r["train_fraction_of_matmul"] >= TARGET_MATMUL_FRACTION
        print(
            f"  {r['clients']} x {r['local_steps']}: local training {r['train_gflops']:.1f} "
            f"GFLOP/s = {100 * r['train_fraction_of_matmul']:.0f}% of matmul "
            f"(target >= {100 * TARGET_MATMUL_FRACTION:.0f}%) {'MET' if ok else 'NOT MET'}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 clients, fewer repeats")
    ap.add_argument("--sizes", default=None, help="comma-separated clients per round")
    ap.add_argument("--steps", default="1,10", help="comma-separated local steps")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    ap.add_argument("--peer-clients", type=int, default=1000, help="clients the loops time")
    ap.add_argument("--no-attacks", action="store_true", help="skip the attack rows")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="only profile the fused round (default sizes 1000, steps 1,10) into DIR",
    )
    args = ap.parse_args(argv)
    if args.profile:
        sizes = [int(x) for x in (args.sizes or "1000").split(",")]
        prof = [
            profile_round(m, int(k), max(1, min(5, 5000 // (m * int(k)))), 15, args.profile)
            for m in sizes
            for k in args.steps.split(",")
        ]
        Path(args.profile, "profile.json").write_text(json.dumps(prof, indent=2))
        return prof
    sizes = [100, 1000] if args.quick else [100, 1000, 10000]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        sys.exit("torch is needed for the PyTorch loop: .venv/bin/pip install -e '.[dev,bench]'")
    info = machine_info()
    print(
        f"jax {info['jax']} on {info['device']}, {info['cores']} cores; "
        f"torch {info.get('torch')}: each config probes torch.set_num_threads({info['cores']}) "
        "and 1 on a few clients and times the faster (printed below)"
    )
    matmul = matmul_gflops(args.repeats)
    print(f"4096x4096 fp32 jnp.dot: {matmul:.1f} GFLOP/s")
    rows, host_cache = [], {}
    for m in sizes:
        for steps in steps_list:
            row = bench_config(m, steps, args, host_cache, matmul)
            rows.append(row)
            u = row["updates_per_s"]
            print(
                f"  {m} clients x {steps} steps: fedsim {u['fedsim_round']:.0f}/s, "
                f"jit loop {u['jit_loop']:.0f}/s, torch {u['torch_loop']:.0f}/s "
                f"({row['bench_seconds']:.0f} s)",
                flush=True,
            )
    print_table(rows, matmul)
    attack_rows = [] if args.no_attacks else bench_attacks(args)
    if attack_rows:
        print("\nattacks at 1000 clients x 1 step (cost relative to the same rule, no attack)")
        for a in attack_rows:
            if "skipped" in a:
                print(f"  {a['case']}: skipped: {a['skipped']}")
            else:
                print(
                    f"  {a['case']}: {1e3 * a['seconds_per_round']:.1f} ms/round, "
                    f"{a['cost_vs_no_attack']:.2f}x no attack "
                    f"({1e3 * a['no_attack_seconds_per_round']:.1f} ms)"
                )
    check_targets(rows, matmul)
    result = {
        "benchmark": "round_throughput",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv else sys.argv[1:])]),
        "config": {
            "dataset": "mnist",
            "model": f"mlp 784-{'-'.join(map(str, WIDTHS))}-10",
            "batch_size": BATCH,
            "client_lr": LR,
            "optimizer": "sgd",
            "partition": "iid over data.n_clients = clients per round",
            "aggregator": "mean",
            "attack": "none",
            "sizes": sizes,
            "local_steps": steps_list,
            "repeats": args.repeats,
            "peer_clients_cap": args.peer_clients,
            "flop_formula": f"6 * {MATMUL_WEIGHTS} * real samples trained",
        },
        "machine": info,
        "matmul_gflops": matmul,
        "targets": {
            "fedsim_vs_torch_at_1000": TARGET_VS_TORCH,
            "train_fraction_of_matmul": TARGET_MATMUL_FRACTION,
        },
        "results": rows,
        "attacks": attack_rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
