"""Who aggregates whose updates (DESIGN.md, "Seams": the ``Topology``).

A topology says how many models the federation holds and, each round, which of the
round's rows each model's aggregator sees, as a weights matrix: row ``k`` is the
``weights`` vector model ``k``'s rule is given (0 = not a neighbour). Every rule already
takes a weights vector (partial participation, dropouts), so a neighbourhood needs no
other mechanism.

- ``star`` (the default): one global model held by a server that aggregates every
  participant: ``[1, m]``, the participants' own weights.
- Peer-to-peer: every client is a node with its own model (``n_models = n_clients``,
  every node takes part each round); node k's rule aggregates the rows of its
  neighbourhood (itself included), ``exchange``-ing models (default) or updates.
  Fixed graphs (an undirected ``[n, n]`` adjacency with self-loops, built once with
  numpy from ``seed`` and checked connected): ``complete``, ``ring``, ``torus`` (2-D,
  ``rows`` × n/rows, wrapping), ``k_regular`` (``k``), ``erdos_renyi`` (``p``, redrawn
  until connected), ``two_worlds`` (two complete halves joined by ``bridges`` edges: the
  bottleneck of He, Karimireddy & Jaggi 2022), ``edges`` (an edge-list file). One that
  changes every round: ``epidemic`` (each node pulls from ``s`` peers drawn afresh, El
  Mrini, Farhadkhani & Guerraoui 2025). ``isolated``: every node sees only itself (each
  client trains alone with the federation's budget: the ``local_only`` baseline of the
  collaboration gain).

Every factory takes ``n_nodes`` (the config's ``data.n_clients``, given by the engine);
a malformed or disconnected graph is a one-line ``ConfigError``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsim.registry import ConfigError, Registry, accepted

REGISTRY = Registry("topology")


class Topology(NamedTuple):
    """n_models: how many models the federation holds (1: a server's global model; 0:
    one per client). neighbourhoods(key, clients [m], weights [m]) -> ``[n_models, m]``:
    the weights each model's rule gives the round's rows. exchange: what peers send
    (``models`` or ``updates``; the star's server always receives updates). adjacency:
    the fixed graph (bool ``[n, n]``, self-loops included) or None (star; a graph drawn
    every round). gather: for sparse graphs, ``gather(key) -> (index [n, K] int32, valid
    [n, K] bool)``, each node's neighbourhood as K row ids, itself first, padded with
    itself (invalid): its rule then runs on those K rows instead of all n (None: the
    dense weights)."""

    name: str
    n_models: int
    neighbourhoods: Callable
    exchange: str = "updates"
    adjacency: np.ndarray | None = None
    gather: Callable | None = None


PER_CLIENT = 0  # n_models of peer-to-peer topologies: one model per client


def _check_exchange(exchange: str) -> None:
    if exchange not in ("models", "updates"):
        raise ConfigError(f"topology.exchange must be models or updates, got {exchange!r}")


def _int_option(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"topology.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"topology.{name} must be {bound}, got {value}")
    return int(value)


def connected(adjacency: np.ndarray) -> bool:
    """Whether the undirected graph ``adjacency`` (bool ``[n, n]``) is connected."""
    n = adjacency.shape[0]
    seen = np.zeros(n, bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = adjacency[frontier].any(axis=0) & ~seen
        seen |= frontier
    return bool(seen.all())


def _graph(name: str, adjacency: np.ndarray, exchange: str) -> Topology:
    """A fixed graph topology: checked symmetric, self-looped and connected."""
    _check_exchange(exchange)
    adjacency = np.asarray(adjacency, bool) | np.eye(adjacency.shape[0], dtype=bool)
    if not (adjacency == adjacency.T).all():
        raise ConfigError(f"topology {name!r}: the graph must be undirected")
    lonely = np.flatnonzero(adjacency.sum(axis=1) == 1)
    if adjacency.shape[0] > 1 and lonely.size:
        raise ConfigError(
            f"topology {name!r}: node {int(lonely[0])} has no neighbours; every node needs "
            "at least one"
        )
    if not connected(adjacency):
        raise ConfigError(f"topology {name!r}: the graph is disconnected; it must be connected")
    mask = jnp.asarray(adjacency)
    neighbourhoods = lambda key, clients, w: jnp.where(mask[clients][:, clients], w[None, :], 0)
    width = int(adjacency.sum(axis=1).max())
    gather = None
    if width <= adjacency.shape[0] // 2:  # sparse: K = max degree + 1 rows per node
        index, valid = neighbour_lists(adjacency)
        gather = lambda key: (jnp.asarray(index), jnp.asarray(valid))
    return Topology(name, PER_CLIENT, neighbourhoods, exchange, adjacency, gather)


def neighbour_lists(adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index [n, K] int32, valid [n, K] bool)``: each node first, then its neighbours
    in order, padded with the node itself (not valid); K = the largest degree + 1."""
    n = adjacency.shape[0]
    width = int(adjacency.sum(axis=1).max())
    index = np.tile(np.arange(n, dtype=np.int32)[:, None], (1, width))
    valid = np.zeros((n, width), bool)
    for i in range(n):
        others = np.flatnonzero(adjacency[i] & (np.arange(n) != i))
        index[i, 1 : 1 + others.size] = others
        valid[i, : 1 + others.size] = True
    return index, valid


def dense(topology: Topology) -> Topology:
    """The same topology with every node's rule over all n rows (weights 0 for
    non-neighbours) instead of gathered neighbourhoods: the reference the gathered form
    is tested against."""
    return topology._replace(gather=None)


def _undirected(n: int, ends, others) -> np.ndarray:
    """``[n, n]`` bool adjacency with an edge between each ``ends[e]`` and ``others[e]``."""
    a = np.zeros((n, n), bool)
    ends, others = np.asarray(ends, np.int64), np.asarray(others, np.int64)
    a[ends, others] = True
    a[others, ends] = True
    return a


@REGISTRY.register("star")
def make_star() -> Topology:
    """A server aggregating every participant into one global model."""
    return Topology("star", 1, lambda key, clients, weights: weights[None, :])


@REGISTRY.register("complete")
def make_complete(n_nodes: int = 2, exchange: str = "models") -> Topology:
    """Every node aggregates every node's row (itself included), weighted by sample
    counts as the rule uses them: with the mean, gossip on a complete graph is FedAvg."""
    return _graph("complete", np.ones((n_nodes, n_nodes), bool), exchange)


@REGISTRY.register("isolated")
def make_isolated(n_nodes: int = 1) -> Topology:
    """Every node keeps to itself: each client trains alone (local-only learning)."""
    eye = np.eye(n_nodes, dtype=bool)
    return Topology("isolated", PER_CLIENT, lambda key, clients, w: jnp.diag(w), "updates", eye)


@REGISTRY.register("ring")
def make_ring(n_nodes: int = 3, exchange: str = "models") -> Topology:
    """Node i's neighbours are i - 1 and i + 1 (mod n); needs n ≥ 3."""
    if n_nodes < 3:
        raise ConfigError(f"topology 'ring' needs at least 3 nodes, got {n_nodes}")
    i = np.arange(n_nodes)
    return _graph("ring", _undirected(n_nodes, i, (i + 1) % n_nodes), exchange)


@REGISTRY.register("torus")
def make_torus(n_nodes: int = 9, rows: int | None = None, exchange: str = "models") -> Topology:
    """A 2-D wrapping grid of ``rows`` × ``n / rows`` nodes (default: the most square
    factorisation), each linked to its four grid neighbours; both sides at least 3."""
    if rows is None:
        rows = max(r for r in range(1, int(np.sqrt(n_nodes)) + 1) if n_nodes % r == 0)
    rows = _int_option("rows", rows, 1)
    cols = n_nodes // rows
    if rows * cols != n_nodes or min(rows, cols) < 3:
        raise ConfigError(
            f"topology 'torus': {n_nodes} nodes do not make a grid of {rows} rows with both "
            "sides at least 3; set data.n_clients to rows x cols (e.g. 9, 12, 16) or "
            "topology.rows to a divisor"
        )
    grid = np.arange(n_nodes).reshape(rows, cols)
    right = _undirected(n_nodes, grid.ravel(), np.roll(grid, -1, axis=1).ravel())
    down = _undirected(n_nodes, grid.ravel(), np.roll(grid, -1, axis=0).ravel())
    return _graph("torus", right | down, exchange)


@REGISTRY.register("k_regular")
def make_k_regular(
    n_nodes: int = 4, k: int = 2, seed: int = 0, exchange: str = "models"
) -> Topology:
    """A random ``k``-regular graph (seeded). k = 2: a ring through a random order of the
    nodes. Otherwise the circulant graph (each node linked to the k/2 nearest on either
    side, and the opposite node when k is odd), then 10·n·k random double-edge swaps, each
    kept when the graph stays simple; a disconnected result is drawn again (at most 100
    times). Needs ``k < n`` and ``n·k`` even."""
    k = _int_option("k", k, 2, n_nodes - 1)
    if (n_nodes * k) % 2:
        raise ConfigError(f"topology 'k_regular': n·k must be even, got n={n_nodes}, k={k}")
    rng = np.random.default_rng(_int_option("seed", seed, 0))
    if k == 2:
        order = rng.permutation(n_nodes)
        return _graph("k_regular", _undirected(n_nodes, order, np.roll(order, 1)), exchange)
    i = np.arange(n_nodes)
    circulant = np.zeros((n_nodes, n_nodes), bool)
    for shift in range(1, k // 2 + 1):
        circulant |= _undirected(n_nodes, i, (i + shift) % n_nodes)
    if k % 2:
        half = np.arange(n_nodes // 2)
        circulant |= _undirected(n_nodes, half, half + n_nodes // 2)
    for _ in range(100):
        adjacency = _swapped(circulant, 10 * n_nodes * k, rng)
        if connected(adjacency):
            return _graph("k_regular", adjacency, exchange)
    raise ConfigError(f"topology 'k_regular': no connected graph with n={n_nodes}, k={k}")


def _swapped(adjacency: np.ndarray, swaps: int, rng) -> np.ndarray:
    """``adjacency`` after ``swaps`` tries of a random double-edge swap (a-b, c-e ->
    a-c, b-e), each kept when the graph stays simple: degrees are preserved. The edge
    list is updated in place rather than re-read from the matrix each try."""
    adjacency = adjacency.copy()
    edges = np.argwhere(np.triu(adjacency, 1))
    for _ in range(swaps):
        x, y = rng.choice(len(edges), 2, replace=False)
        (a, b), (c, e) = edges[x], edges[y]
        if len({a, b, c, e}) < 4 or adjacency[a, c] or adjacency[b, e]:
            continue
        adjacency[[a, b, c, e], [b, a, e, c]] = False
        adjacency[[a, c, b, e], [c, a, e, b]] = True
        edges[x], edges[y] = (a, c), (b, e)
    return adjacency


@REGISTRY.register("erdos_renyi")
def make_erdos_renyi(
    n_nodes: int = 2, p: float = 0.5, seed: int = 0, exchange: str = "models"
) -> Topology:
    """Each pair linked with probability ``p`` (seeded), redrawn until connected (at most
    100 draws)."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise ConfigError(f"topology.p must be a probability in (0, 1], got {p!r}")
    rng = np.random.default_rng(_int_option("seed", seed, 0))
    for _ in range(100):
        upper = np.triu(rng.random((n_nodes, n_nodes)) < p, 1)
        adjacency = upper | upper.T
        if connected(adjacency | np.eye(n_nodes, dtype=bool)):
            return _graph("erdos_renyi", adjacency, exchange)
    hint = np.log(n_nodes) / n_nodes
    raise ConfigError(
        f"topology 'erdos_renyi': p={p} gave no connected graph on {n_nodes} nodes in 100 "
        f"draws; raise p (connectivity needs about p > ln(n)/n = {hint:.3f})"
    )


@REGISTRY.register("two_worlds")
def make_two_worlds(
    n_nodes: int = 4, bridges: int = 1, seed: int = 0, exchange: str = "models"
) -> Topology:
    """Two complete clusters (nodes ``0 .. n//2 - 1`` and the rest) joined by ``bridges``
    distinct random edges between them (seeded): the bottleneck case."""
    half = n_nodes // 2
    if half < 2:
        raise ConfigError(f"topology 'two_worlds' needs at least 4 nodes, got {n_nodes}")
    bridges = _int_option("bridges", bridges, 1, half * (n_nodes - half))
    rng = np.random.default_rng(_int_option("seed", seed, 0))
    adjacency = np.zeros((n_nodes, n_nodes), bool)
    adjacency[:half, :half] = True
    adjacency[half:, half:] = True
    cross = rng.choice(half * (n_nodes - half), bridges, replace=False)
    side = n_nodes - half
    adjacency |= _undirected(n_nodes, cross // side, half + cross % side)
    return _graph("two_worlds", adjacency, exchange)


@REGISTRY.register("edges")
def make_edges(n_nodes: int = 2, path: str = "", exchange: str = "models") -> Topology:
    """An undirected graph from a text file: one edge per line, two node ids (0 to n - 1)
    separated by a space or a comma; blank lines and lines starting with ``#`` skipped."""
    file = Path(path)
    if not path or not file.is_file():
        raise ConfigError(f"topology 'edges': path {path!r} is not a file; give an edge list")
    pairs = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.replace(",", " ").split()
        if len(fields) != 2 or not all(f.lstrip("-").isdigit() for f in fields):
            raise ConfigError(
                f"topology 'edges': {path} line {number} is {text!r}; want two node ids"
            )
        a, b = (int(f) for f in fields)
        bad = [v for v in (a, b) if not 0 <= v < n_nodes]
        if bad:
            raise ConfigError(
                f"topology 'edges': {path} line {number} names node {bad[0]}; ids must be "
                f"0 to {n_nodes - 1} (data.n_clients = {n_nodes})"
            )
        pairs.append((a, b))
    ends, others = np.asarray(pairs, np.int64).reshape(-1, 2).T
    return _graph("edges", _undirected(n_nodes, ends, others), exchange)


@REGISTRY.register("epidemic")
def make_epidemic(n_nodes: int = 2, s: int = 1, exchange: str = "models") -> Topology:
    """Every round each node pulls from ``s`` peers drawn uniformly afresh (without
    replacement, itself excluded) and aggregates them with its own row: a directed graph
    that changes every round."""
    s = _int_option("s", s, 1, n_nodes - 1)
    _check_exchange(exchange)

    def peers(key):  # [n, s]: the peers each node pulls from this round
        scores = jax.random.uniform(key, (n_nodes, n_nodes))
        return jax.lax.top_k(jnp.where(jnp.eye(n_nodes, dtype=bool), -1.0, scores), s)[1]

    def neighbourhoods(key, clients, w):
        m = clients.shape[0]
        pulled = jnp.zeros((m, m), bool).at[jnp.arange(m)[:, None], peers(key)].set(True)
        return jnp.where(pulled | jnp.eye(m, dtype=bool), w[None, :], 0)

    def gather(key):
        index = jnp.concatenate([jnp.arange(n_nodes)[:, None], peers(key)], axis=1)
        return index.astype(jnp.int32), jnp.ones((n_nodes, s + 1), bool)

    sparse = s + 1 <= n_nodes // 2
    return Topology(
        "epidemic", PER_CLIENT, neighbourhoods, exchange, None, gather if sparse else None
    )


def make(name: str, n_nodes: int | None = None, **kw) -> Topology:
    """Build topology ``name`` over ``n_nodes`` nodes (ignored by ``star``). A graph is
    built once per (name, n_nodes, options): validation, set-up, the round and the
    evaluation all ask for it."""
    try:
        return _built(name, n_nodes, tuple(sorted(kw.items())))
    except TypeError:  # an unhashable option value: build it as it is (the factory checks it)
        return _build(name, n_nodes, kw)


@functools.lru_cache(maxsize=64)
def _built(name: str, n_nodes: int | None, items: tuple) -> Topology:
    return _build(name, n_nodes, dict(items))


def _build(name: str, n_nodes: int | None, kw: dict) -> Topology:
    factory = REGISTRY.get(name)
    fixed = accepted(factory, n_nodes=n_nodes) if n_nodes is not None else {}
    return factory(**fixed, **kw)
