"""Robust aggregation rules, registered by name (DESIGN.md, "Types").

``make(name, **kw)`` builds an ``Aggregator``; ``reduce(name, updates, weights)`` applies a
stateless rule to a plain ``[n, d]`` array or a client-stacked pytree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim.registry import Registry
from fedsim.types import AggContext, Aggregator, AggInfo

REGISTRY = Registry("aggregator")


def make(name: str, **kw) -> Aggregator:
    """Build the aggregator registered as ``name`` with options ``kw``."""
    return REGISTRY.make(name, **kw)


def _no_state(flat_params, n_clients):
    return ()


def normalized(weights: jax.Array) -> jax.Array:
    """``weights / sum(weights)``, 0 everywhere when all weights are 0."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


@REGISTRY.register("mean")
def make_mean() -> Aggregator:
    """Weighted mean (FedAvg, McMahan et al. 2017): ``sum_i w_i u_i / sum_i w_i``.

    Not robust: one non-finite or huge row poisons it (the run then reports divergence).
    AggInfo.weight = normalised weights.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        share = normalized(weights.astype(updates.dtype))
        return share @ updates, state, AggInfo(weight=share)

    return Aggregator(init=_no_state, aggregate=aggregate)


def reduce(name: str, updates, weights=None, *, ctx: AggContext | None = None, **kw):
    """Apply rule ``name`` once to ``updates`` (``[n, d]`` array or client-stacked pytree).

    Returns the aggregate in the same structure as one row of ``updates``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    n = leaves[0].shape[0]
    flat = jnp.concatenate([jnp.reshape(x, (n, -1)) for x in leaves], axis=1)
    if weights is None:
        weights = jnp.ones((n,), flat.dtype)
    agg = make(name, **kw)
    if ctx is None:
        ctx = AggContext(global_params=jnp.zeros(flat.shape[1], flat.dtype),
                         key=jax.random.PRNGKey(0), hparams={})
    out, _, _ = agg.aggregate(flat, jnp.asarray(weights), agg.init(ctx.global_params, n), ctx)
    sizes = [x[0].size for x in leaves]
    parts = jnp.split(out, list(jnp.cumsum(jnp.array(sizes))[:-1]))
    return jax.tree_util.tree_unflatten(
        treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves, strict=True)]
    )
