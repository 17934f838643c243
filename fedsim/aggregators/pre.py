"""Pre-aggregation stages, composable in front of any rule.

A stage maps the round's rows to new rows before the rule sees them:
``apply(updates [n, d], weights [n], state, ctx) -> (rows [r, d], weights [r], state,
mix [r, n])`` where ``rows = mix @ updates`` for the finite rows (``mix`` is how much of
each client went into each new row). The composed rule's ``AggInfo.weight`` is the rule's
own weight carried back through the stages, ``weight @ mix_k @ ... @ mix_1``, so it is
still each client's contribution to the aggregate.

Composition (``fedsim.aggregators.make``)::

    make("trimmed_mean", beta=0.1, pre=["nnm"], f=10)
    make("krum", f=3, pre=[{"name": "bucketing", "s": 2}])
    make("mean", pre=[{"name": "clip", "clip_norm": 5.0}, "nnm"], f=2)

or in a config: ``aggregator: {name: trimmed_mean, beta: 0.1, f: 10, pre: [nnm]}`` /
``pre: [{name: nnm, f: 10}]``. Stages run in list order. A stage named by a string takes
every top-level option its record declares (here ``f`` goes to NNM; an option is passed to
the rule only if the rule declares it); a stage given as a mapping takes only the options
written in it. An option that no stage and not the rule declares is a ``ConfigError``.
Traced options of stages are read from ``ctx.hparams`` like the rule's (``clip_norm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim import kernels as ops
from fedsim.aggregators.base import PRE, PreAggregator, no_state
from fedsim.options import Option, at_least
from fedsim.types import AggContext


@PRE.register("clip", options={"clip_norm": Option(1.0, traced=True)})
def make_clip(clip_norm: float) -> PreAggregator:
    """Static-threshold clipping: each finite row scaled to norm at most ``clip_norm``
    (traced, ``hparams["clip_norm"]``). Non-finite rows pass unchanged, for the rule to
    exclude. mix = diag(shrink factor), 1 for a zero row (nothing to shrink)."""

    def apply(updates, weights, state, ctx: AggContext):
        tau = ctx.hparams.get("clip_norm", clip_norm)
        ok = ops.finite_rows(updates)
        norms = jnp.where(ok, jnp.sqrt(ops.row_sq_norms(updates)), 0)
        scale = jnp.where(norms > tau, tau / jnp.where(norms > tau, norms, 1), 1.0)
        return updates * scale[:, None], weights, state, jnp.diag(scale)

    return PreAggregator(init=no_state, apply=apply)


@PRE.register("nnm", options={"f": Option(0, at_least(0))})
def make_nnm(f: int) -> PreAggregator:
    """Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by mixing").

    Each present finite row becomes the mean of its ``m - f`` nearest present rows in L2
    (itself included; ties in distance go to the lower index; at least 1). Distances from
    one Gram matrix. Non-finite rows are nobody's neighbour, and pass unchanged, for the
    rule to exclude: with fewer than ``m - f`` finite present rows a row mixes the finite
    ones. Absent rows stay absent and are nobody's neighbour.
    """

    def apply(updates, weights, state, ctx: AggContext):
        present = ops.present_mask(weights)
        ok = present & ops.finite_rows(updates)
        dist = ops.pairwise_sq_dists(updates, ok)
        q = jnp.maximum(jnp.sum(present) - f, 1)
        near = (jax.vmap(ops.ranks)(dist) < q) & ok[:, None] & ok[None, :]
        mix = near / jnp.maximum(jnp.sum(near, 1, keepdims=True), 1)
        mix = jnp.where(ok[:, None], mix, jnp.eye(updates.shape[0]))
        rows = jnp.where(ok[:, None], ops.combine(mix, updates, ok), updates)
        return rows, weights, state, mix.astype(updates.dtype)

    return PreAggregator(init=no_state, apply=apply)


@PRE.register("bucketing", options={"s": Option(2, at_least(1))})
def make_bucketing(s: int) -> PreAggregator:
    """Bucketing (Karimireddy, He & Jaggi 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing").

    Present clients are shuffled (``ctx.key``) and cut into consecutive buckets of ``s``
    (static); each bucket becomes the weighted mean of its members, with weight = the sum of
    theirs. Output rows: ``⌈n/s⌉`` (a bucket with no present member is absent). The
    downstream rule's ``f`` counts buckets.
    """

    def apply(updates, weights, state, ctx: AggContext):
        n = updates.shape[0]
        present = ops.present_mask(weights)
        noise = jax.random.uniform(ctx.key, (n,))
        order = jnp.argsort(jnp.where(present, noise, 2.0))  # present clients first
        bucket = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n) // s)
        n_buckets = -(-n // s)
        member = (jnp.arange(n_buckets)[:, None] == bucket[None]) & present[None]
        w = jnp.where(member, weights[None].astype(updates.dtype), 0)
        total = jnp.sum(w, axis=1)
        mix = ops.safe_div(w, total[:, None])
        ok = ops.finite_rows(updates)
        rows = ops.combine(mix, updates, ok)
        spoiled = jnp.any(member & ~ok[None], axis=1)  # a non-finite member spoils its bucket
        return jnp.where(spoiled[:, None], jnp.nan, rows), total, state, mix

    return PreAggregator(init=no_state, apply=apply)
