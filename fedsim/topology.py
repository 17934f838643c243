"""Who aggregates whose updates (DESIGN.md, "Seams": the ``Topology``).

A topology says how many models the federation holds and, each round, which of the
round's rows each model's aggregator sees, as a weights matrix: row ``k`` is the
``weights`` vector model ``k``'s rule is given (0 = not a neighbour). Every rule already
takes a weights vector (partial participation, dropouts), so a neighbourhood needs no
other mechanism.

- ``star`` (the default): one global model held by a server that aggregates every
  participant: ``[1, m]``, the participants' own weights.

Peer-to-peer graphs (one model per node, ``[n_nodes, m]`` neighbourhoods, the rule
vmapped over nodes) plug in here: register a factory returning a ``Topology``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fedsim.registry import Registry

REGISTRY = Registry("topology")


class Topology(NamedTuple):
    """n_models: how many models the federation holds (1: a server's global model).
    neighbourhoods(key, clients [m], weights [m]) -> ``[n_models, m]``: the weights each
    model's rule gives the round's rows."""

    name: str
    n_models: int
    neighbourhoods: Callable


@REGISTRY.register("star")
def make_star() -> Topology:
    """A server aggregating every participant into one global model."""
    return Topology("star", 1, lambda key, clients, weights: weights[None, :])


def make(name: str, **kw) -> Topology:
    return REGISTRY.make(name, **kw)
