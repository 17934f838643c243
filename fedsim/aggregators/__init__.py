"""Robust aggregation rules, registered by name (DESIGN.md, "Types").

``make(name, **kw)`` builds an ``Aggregator``; ``reduce(name, updates, weights)`` applies a
stateless rule to a plain ``[n, d]`` array or a client-stacked pytree.

Rules live in ``distance`` (median, trimmed_mean, krum, multi_krum, bulyan,
geometric_median, centered_clipping, norm_bound, meamed, dnc, foolsgold, signguard) and
``behaviour`` (fltrust, zeno, loss_rejection, error_rejection); the kernels they share
(Gram-matrix distances, radix-select order statistics) in ``_ops``. Pre-aggregation
stages (clip, nnm, bucketing) live in ``pre`` and compose in front of any rule with
``make(name, pre=[...], **kw)``; see ``pre`` for the syntax and how options are routed.

Options a sweep varies are declared ``traced`` at registration and read at aggregate time
from ``ctx.hparams`` (falling back to the factory's value), so a sweep does not recompile;
integer options that fix shapes or code paths (f, bucket size, iterations) are static.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from fedsim import kernels as ops
from fedsim.registry import ConfigError, Registry
from fedsim.types import AggContext, AggInfo, Aggregator

REGISTRY = Registry("aggregator")


def make(name: str, pre=None, **kw) -> Aggregator:
    """Build the aggregator registered as ``name`` with options ``kw``.

    ``pre``: optional list of pre-aggregation stages run before the rule, each a stage
    name or a mapping ``{"name": ..., **options}`` (see ``fedsim.aggregators.pre``).
    """
    if not pre:
        return REGISTRY.make(name, **kw)
    rule = REGISTRY.get(name)
    stages, used = [], set()
    for entry in pre:
        if isinstance(entry, str):
            factory = PRE.get(entry)
            opts = {k: v for k, v in kw.items() if _accepts(factory, k)}
        elif isinstance(entry, dict) and "name" in entry:
            factory = PRE.get(entry["name"])
            opts = {k: v for k, v in entry.items() if k != "name"}
        else:
            raise ConfigError(f"pre entries are stage names or {{name: ..., ...}}, got {entry!r}")
        used.update(opts)
        stages.append(_call(factory, entry if isinstance(entry, str) else entry["name"], opts))
    rule_kw = {k: v for k, v in kw.items() if _accepts(rule, k)}
    unused = set(kw) - set(rule_kw) - used
    if unused:
        raise ConfigError(f"aggregator {name!r}: unknown option(s) {', '.join(sorted(unused))}")
    return _compose(stages, _call(rule, name, rule_kw))


def _accepts(factory, option: str) -> bool:
    params = inspect.signature(factory).parameters.values()
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


def _call(factory, name, opts):
    try:
        return factory(**opts)
    except TypeError as err:
        raise ConfigError(f"{name}: {err}") from None


def _compose(stages, rule: Aggregator) -> Aggregator:
    """Run ``stages`` (``PreAggregator``s) in order, then ``rule``.

    State: ``{"pre": (stage states...), "rule": rule state}``. AggInfo.weight is the rule's
    weight carried back through each stage's mixing matrix.
    """

    def init(flat_params, n_clients):
        return {
            "pre": tuple(s.init(flat_params, n_clients) for s in stages),
            "rule": rule.init(flat_params, n_clients),
        }

    def aggregate(updates, weights, state, ctx: AggContext):
        keys = jax.random.split(ctx.key, len(stages) + 1)
        rows, w, mixes, pre_states = updates, weights, [], []
        for stage, st, key in zip(stages, state["pre"], keys[1:], strict=True):
            rows, w, st, mix = stage.apply(rows, w, st, ctx._replace(key=key))
            mixes.append(mix)
            pre_states.append(st)
        out, rule_state, info = rule.aggregate(rows, w, state["rule"], ctx._replace(key=keys[0]))
        weight = info.weight
        for mix in reversed(mixes):
            weight = ops.dot(weight, mix)
        return out, {"pre": tuple(pre_states), "rule": rule_state}, AggInfo(weight=weight)

    return Aggregator(init=init, aggregate=aggregate)


def _no_state(flat_params, n_clients):
    return ()


def normalized(weights: jax.Array) -> jax.Array:
    """``weights / sum(weights)``, 0 everywhere when all weights are 0."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


@REGISTRY.register("mean")
def make_mean() -> Aggregator:
    """Weighted mean (FedAvg, McMahan et al. 2017): ``sum_i w_i u_i / sum_i w_i``.

    Not robust: one non-finite or huge row poisons it (the run then reports divergence);
    absent rows (weight 0) are ignored even if non-finite. AggInfo.weight = normalised
    weights.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        share = normalized(weights.astype(updates.dtype))
        return ops.combine(share, updates, weights > 0), state, AggInfo(weight=share)

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
        ctx = AggContext(
            global_params=jnp.zeros(flat.shape[1], flat.dtype),
            key=jax.random.PRNGKey(0),
            hparams={},
        )
    out, _, _ = agg.aggregate(flat, jnp.asarray(weights), agg.init(ctx.global_params, n), ctx)
    sizes = [x[0].size for x in leaves]
    parts = jnp.split(out, list(jnp.cumsum(jnp.array(sizes))[:-1]))
    return jax.tree_util.tree_unflatten(
        treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves, strict=True)]
    )


# the rule modules register themselves on import
from fedsim.aggregators import behaviour, distance  # noqa: E402, F401
from fedsim.aggregators.pre import PRE  # noqa: E402
