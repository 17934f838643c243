"""Robust aggregation rules, registered by name (DESIGN.md, "Types").

``make(name, **kw)`` builds an ``Aggregator``; ``reduce(name, updates, weights)`` applies a
stateless rule to a plain ``[n, d]`` array or a client-stacked pytree.

The registries, ``make``, ``reduce``, the composition with pre-aggregation stages and the
FedAvg mean live in ``base``; the rules in ``distance`` (median, trimmed_mean, krum,
multi_krum, bulyan, geometric_median, centered_clipping, norm_bound, meamed, dnc,
foolsgold, signguard), ``behaviour`` (fltrust, zeno, loss_rejection, error_rejection) and
``peer`` (gossip, self_centered_clipping, balance, ubar: peer-to-peer only);
the kernels they share (Gram-matrix distances, radix-select order statistics) in
``fedsim.kernels``. Pre-aggregation stages (clip, nnm, bucketing) live in ``pre`` and
compose in front of any rule with ``make(name, pre=[...], **kw)``; see ``pre`` for the
syntax and how options are routed.

Each rule and stage declares its options as ``fedsim.options.Option`` records at
registration: those a sweep varies are ``traced`` and read at aggregate time from
``ctx.hparams`` (falling back to the factory's value), so a sweep does not recompile;
integer options that fix shapes or code paths (f, bucket size, iterations) are static.
Each rule also declares its ``Geometry`` (``base``), which the attacks read.

This module only re-exports; the rule modules import from ``base``.
"""

from __future__ import annotations

from fedsim.aggregators import behaviour, distance, peer, pre  # noqa: F401  (they register)
from fedsim.aggregators.base import (
    PRE,
    REGISTRY,
    Geometry,
    PreAggregator,
    make,
    no_state,
    normalized,
    reduce,
)

__all__ = [
    "PRE",
    "REGISTRY",
    "Geometry",
    "PreAggregator",
    "make",
    "no_state",
    "normalized",
    "reduce",
]
