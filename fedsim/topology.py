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
  ``complete``: every node sees every node; ``isolated``: every node sees only itself
  (each client trains alone with the federation's budget: the ``local_only`` baseline
  of the collaboration gain).

A new graph is a factory returning a ``Topology`` whose ``neighbourhoods`` gives the
``[n_nodes, m]`` weights (sparse graphs gather the neighbourhoods' rows instead: issue
"Peer-to-peer learning").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from fedsim.registry import ConfigError, Registry

REGISTRY = Registry("topology")


class Topology(NamedTuple):
    """n_models: how many models the federation holds (1: a server's global model; 0:
    one per client). neighbourhoods(key, clients [m], weights [m]) -> ``[n_models, m]``:
    the weights each model's rule gives the round's rows. exchange: what peers send
    (``models`` or ``updates``; the star's server always receives updates)."""

    name: str
    n_models: int
    neighbourhoods: Callable
    exchange: str = "updates"


PER_CLIENT = 0  # n_models of peer-to-peer topologies: one model per client


def _check_exchange(exchange: str) -> None:
    if exchange not in ("models", "updates"):
        raise ConfigError(f"topology.exchange must be models or updates, got {exchange!r}")


@REGISTRY.register("star")
def make_star() -> Topology:
    """A server aggregating every participant into one global model."""
    return Topology("star", 1, lambda key, clients, weights: weights[None, :])


@REGISTRY.register("complete")
def make_complete(exchange: str = "models") -> Topology:
    """Every node aggregates every node's row (itself included), weighted by sample
    counts as the rule uses them: with the mean, gossip on a complete graph is FedAvg."""
    _check_exchange(exchange)
    return Topology(
        "complete",
        PER_CLIENT,
        lambda key, clients, w: jnp.broadcast_to(w, (w.shape[0],) * 2),
        exchange,
    )


@REGISTRY.register("isolated")
def make_isolated() -> Topology:
    """Every node keeps to itself: each client trains alone (local-only learning)."""
    return Topology("isolated", PER_CLIENT, lambda key, clients, w: jnp.diag(w), "updates")


def make(name: str, **kw) -> Topology:
    return REGISTRY.make(name, **kw)
