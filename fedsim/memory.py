"""Memory planning: estimate a program's device memory before compiling it, and choose
how many runs to vmap at once and how many clients to train at once so it fits.

The estimate (bytes, float32 = 4) for ``B`` vmapped runs, ``m`` participants, ``d``
parameters and ``c`` clients trained at once (on ``D`` devices sharing the client axis):

- data, shared by every run: the arrays of ``setup.data`` (training set, index table,
  test and judge sets);
- per run, the state held across rounds (params, server optimizer, aggregator state, read
  from ``jax.eval_shape`` of init), twice: the scan carries an input and an output copy;
- per run, the round's update matrices ``[m, d]``: the trained matrix (and, when every
  client trains at once, the client pytrees it is ravelled from; clients trained in
  chunks write their ravelled rows straight into it), the crafted matrix when there is an
  attack, the benign ones when the attack needs them, and the aggregator's working set
  (``AGG_COPIES`` matrices plus an ``m x m`` Gram matrix; for a rule registered
  ``matrix_free``, such as the mean, one masked column block of ``kernels.combine``);
  divided by ``D`` when the client axis is sharded;
- per run, local training of ``c`` clients at once: per client a params copy, its
  gradient, new params and optimizer slots, plus activations of a batch;
- per run, evaluation activations of one 1,000-sample test batch.

Peer-to-peer (one model per node, ``n = m`` nodes), the aggregation's term is per node:
each node's rule holds its ``K`` neighbourhood rows (``K = n`` on a dense graph): the
gathered rows, the crafted rows when there is an attack, the rule's working set and a
``K x K`` Gram matrix, for ``c`` nodes at once (the same chunk as training) beside the
round's ``[n, d]`` trained, sent and benign matrices. A columnwise rule run by column
blocks (``fedsim.round.by_column_blocks``) holds instead every node's ``[K, block]``
rows and working set at once (an upper bound when ``round.column_layout`` takes nodes a
chunk at a time), beside the round's matrices and its ``[n, d]`` steps.

It is deliberately conservative (XLA reuses buffers, so the compiled program usually
needs less); ``tests/test_memory.py`` checks it stays above XLA's own figure.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from fedsim.registry import ConfigError

GB = 1024**3
DEFAULT_FRACTION = 0.8  # of device (or, on CPU, physical) memory
AGG_COPIES = 2  # [m, d] matrices an aggregation rule may hold besides its input
OPT_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}


class Plan(NamedTuple):
    batch: int  # runs vmapped in one program
    client_chunk: int | None  # clients trained at once (None: all participants)
    estimate_bytes: int  # estimated peak device memory of the program
    budget_bytes: int


def device_memory_bytes() -> int:
    """Memory of the first device: the allocator's limit on an accelerator, the machine's
    physical memory on CPU."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(memory_gb: float | None = None) -> int:
    """``memory_gb`` GiB if given, else DEFAULT_FRACTION of the device memory."""
    if memory_gb is not None:
        if not (math.isfinite(memory_gb) and memory_gb > 0):
            raise ConfigError(f"--memory-gb must be a finite number of GiB > 0, got {memory_gb}")
        return int(memory_gb * GB)
    return int(DEFAULT_FRACTION * device_memory_bytes())


def _nbytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


class Footprint(NamedTuple):
    """Setup-derived sizes the estimate is a function of (bytes unless said)."""

    data: int
    state: int  # one run's RunState
    d: int  # parameters
    participants: int
    update_copies: int  # [m, d] matrices live in a round, besides the aggregator's
    per_client_train: int  # bytes one client needs while it trains
    eval_act: int
    matrix_free: bool = False  # the rule holds no [m, d] or m x m working set
    neighbourhood: int | None = None  # peer-to-peer: rows a node's rule holds (K)
    column_block: int | None = None  # peer-to-peer by column blocks: columns held at once


def footprint(setup) -> Footprint:
    """Measure what the estimate needs from a Setup (shapes only: nothing is compiled)."""
    import jax

    from fedsim.aggregators import REGISTRY as RULES
    from fedsim.round import make_init
    from fedsim.setup import components

    spec = setup.spec
    _, attack = components(setup)
    hp_shape = _hparams_shapes(setup)
    state = jax.eval_shape(make_init(setup), jax.random.PRNGKey(0), hp_shape)
    d = setup.n_params
    copies = 2 + (attack.craft is not None) + 2 * bool(attack.needs_benign)
    widths = _activation_width(setup)
    slots = OPT_SLOTS.get(spec.client_optimizer, 2)
    per_client = 4 * d * (4 + slots) + 4 * 3 * spec.batch_size * widths
    return Footprint(
        data=_nbytes(setup.data),
        state=_nbytes(state),
        d=d,
        participants=spec.participants,
        update_copies=copies,
        per_client_train=per_client,
        eval_act=4 * 3 * min(1000, int(setup.data.x_test.shape[0])) * widths,
        matrix_free=RULES.matrix_free(spec.aggregator) and not spec.has_pre_stages,
        **_neighbourhoods(setup, attack),
    )


def _neighbourhoods(setup, attack) -> dict:
    """Peer-to-peer (nothing on the star): ``neighbourhood``, the rows one node's rule
    holds (its gathered neighbourhood's width, or every node on a dense graph), and
    ``column_block``, the columns of every neighbourhood held at once when the round runs
    its rule by column blocks (``fedsim.round.runs_by_columns``)."""
    import jax

    from fedsim.round import column_layout, runs_by_columns
    from fedsim.setup import is_peer_to_peer, topology_of

    spec = setup.spec
    if not is_peer_to_peer(spec):
        return {}
    topo = topology_of(spec)
    if topo.gather is None:
        return {"neighbourhood": spec.n_clients}
    index, _ = jax.eval_shape(topo.gather, jax.random.PRNGKey(0))
    nodes, rows = (int(s) for s in index.shape)
    if not runs_by_columns(spec, topo, attack):
        return {"neighbourhood": rows}
    return {"neighbourhood": rows, "column_block": column_layout(nodes, rows, spec.aggregator)[0]}


def _hparams_shapes(setup):
    """HParams of scalars with the attack/aggregator keys the Spec's components trace."""
    import jax
    import jax.numpy as jnp

    from fedsim import aggregators, attacks
    from fedsim.spec import HParams

    spec = setup.spec
    s = jax.ShapeDtypeStruct((), jnp.float32)
    agg = {k: s for k in aggregators.REGISTRY.traced(spec.aggregator)}
    att = {k: s for k in attacks.REGISTRY.traced(spec.attack)}
    return HParams(s, s, s, s, s, agg, att)


def _activation_width(setup) -> int:
    """Floats per sample a forward pass holds: the input and every layer's output, read
    from the model itself (flax's captured intermediates, traced abstractly)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, *setup.input_shape), jnp.float32)
    params = jax.eval_shape(setup.init_params, jax.random.PRNGKey(0))

    def forward(p, xb):
        return setup.module.apply(
            {"params": p}, xb, capture_intermediates=True, mutable=["intermediates"]
        )

    _, captured = jax.eval_shape(forward, params, x)
    layers = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(captured))
    return int(math.prod(setup.input_shape) + layers)


def estimate(
    fp: Footprint,
    batch: int,
    client_chunk: int | None,
    n_devices: int = 1,
    participants: int | None = None,
) -> int:
    """Estimated peak bytes for ``batch`` runs at ``client_chunk`` clients at once."""
    m = participants or fp.participants
    c = m if client_chunk is None else min(client_chunk, m)
    if fp.neighbourhood is None:
        # chunked training writes each client's ravelled row into the one [m, d] matrix
        copies = fp.update_copies - (c < m)
        updates = 4 * m * fp.d * copies
        if fp.matrix_free:  # at most a masked column block (``kernels.combine``)
            from fedsim.kernels import PASS_ENTRIES

            updates += 4 * min(m * fp.d, 2 * PASS_ENTRIES)
        else:
            updates += 4 * m * fp.d * AGG_COPIES + 4 * m * m
    elif fp.column_block is None:  # [n, d] round matrices, then c nodes' [K, d] rows
        k = fp.neighbourhood  # and rule working sets
        rows = k * fp.d * (fp.update_copies - 1 + AGG_COPIES) + k * k
        updates = 4 * m * fp.d * fp.update_copies + 4 * c * rows
    else:  # [n, d] round matrices and the steps, then every node's [K, block] rows
        k = fp.neighbourhood
        rows = k * min(fp.column_block, fp.d) * (1 + AGG_COPIES) + k * k
        updates = 4 * m * fp.d * (fp.update_copies + 1) + 4 * m * rows
    per_run = (
        2 * fp.state + updates // n_devices + c * fp.per_client_train // n_devices + fp.eval_act
    )
    return fp.data + batch * per_run


def _chunks(m: int):
    c = m
    while True:
        yield c
        if c == 1:
            return
        c = max(1, c // 2)


def plan(setup, n_runs: int, budget: int, n_devices: int = 1, max_batch: int | None = None) -> Plan:
    """The largest client chunk (all participants if possible) at which one run fits,
    then as many runs per batch as fit. Raises a one-line ``ConfigError`` when even one
    run training one client at a time does not fit."""
    fp = footprint(setup)
    m = fp.participants
    for c in _chunks(m):
        one = estimate(fp, 1, c, n_devices)
        if one <= budget:
            per_run = one - fp.data
            batch = max(1, min(n_runs, (budget - fp.data) // max(per_run, 1)))
            if max_batch is not None:
                batch = max(1, min(batch, max_batch))
            chunk = None if c == m else c
            return Plan(int(batch), chunk, estimate(fp, batch, c, n_devices), budget)
    need = estimate(fp, 1, 1, n_devices)
    lo, hi = 0, m - 1  # largest participant count that fits (the estimate grows with it)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(fp, 1, 1, n_devices, mid) <= budget else (lo, mid - 1)
    hint = f"client.participants={lo}" if lo else "none (the data alone does not fit)"
    raise ConfigError(
        f"{setup.spec.participants} participants x {fp.d} parameters needs an estimated "
        f"{_size(need)} even with 1 run and 1 client trained at a time, but the memory "
        f"budget is {_size(budget)} (--memory-gb); largest that fits: {hint}"
    )


def _size(n_bytes: int) -> str:
    """Bytes as GB (2 decimals) from 1 GiB up, else MB or kB, so small figures differ."""
    if n_bytes >= GB:
        return f"{n_bytes / GB:.2f} GB"
    if n_bytes >= 1024**2:
        return f"{n_bytes / 1024**2:.1f} MB"
    return f"{n_bytes / 1024:.1f} kB"


def lay_out(
    setup, n_runs: int, budget: int, devices: int | None = None, max_batch: int | None = None
):
    """Plan memory for ``n_runs`` runs of ``setup`` and apply the plan: the client mesh
    over ``devices`` devices (``1`` = none, ``None`` = all that divide the participants)
    and the client chunk. Returns ``(setup, plan)``; refuses like :func:`plan`."""
    from fedsim.layout import client_mesh, with_layout

    mesh = None if devices == 1 else client_mesh(devices, setup.spec.participants)
    n_dev = 1 if mesh is None else mesh.devices.size
    chosen = plan(setup, n_runs, budget, n_devices=n_dev, max_batch=max_batch)
    return with_layout(setup, client_chunk=chosen.client_chunk, mesh=mesh), chosen
